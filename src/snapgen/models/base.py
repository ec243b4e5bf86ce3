"""The Denoiser interface every snapgen model family follows (image or video, DiT or U-Net).

EDM2's explicit denoiser ``D(x, sigma, ...)``, in flow form (conventions: ``docs/conventions.md``)::

    v = model(x, t, cond)                                   # velocity v = eps - x0
    v, feats = model(x, t, cond, features=("last",))        # + named feature taps

- ``x``: ``(B, C, h, w)`` image latents (``(B, C, T, h, w)`` for video families);
- ``t``: ``(B,)`` or a scalar, flow time in [0, 1], ``t = 1`` is noise;
- ``cond``: a dict of batch tensors. Image families read ``"text"`` ``(B, L, text_dim)`` and ``"text_mask"``
  ``(B, L)`` bool (True = real token; optional). Later families add keys (canvas tokens, caches). Keys a model
  does not read are errors, so a misspelt key never silently drops conditioning.
- ``features``: names of feature taps to return (``model.feature_taps`` lists them; ``"last"`` = the tokens
  entering the output layer, what SnapGen++'s feature KD reads). Knowledge distillation across
  architectures and discriminators read these instead of a model-specific ``return_features`` flag.

Capabilities are separate, small ``runtime_checkable`` protocols (``Elastic``, ``AdapterHost``); code asks
``isinstance(model, Elastic)`` instead of assuming. Every registered family passes the contract tests in
``tests/contracts/denoiser.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["Denoiser", "Elastic", "AdapterHost", "Cond", "denoiser_call", "text_cond", "check_features",
           "is_supernet", "DenoiserMixin"]

Cond = Mapping[str, torch.Tensor]

@runtime_checkable
class Denoiser(Protocol):
    """``forward(x, t, cond, *, features=())``; ``config`` with ``in_channels`` and ``latent_multiple``
    (latent pixels per coarsest token along each axis), ``family`` (its registry name), ``feature_taps``
    and ``stages(latent_hw)`` for summaries."""

    config: Any
    family: str
    feature_taps: tuple[str, ...]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, *, features: Sequence[str] = ()): ...

    def stages(self, latent_hw: tuple[int, int]) -> list[dict]: ...


@runtime_checkable
class Elastic(Protocol):
    """A model with width-sliced sub-networks [SnapGen++ Sec. 3.2]: ``variants`` maps names to width ratios
    (``{"full": 1.0}`` alone for an ordinary model of an elastic-capable family; :func:`is_supernet` tells
    whether it serves more than one)."""

    @property
    def variants(self) -> dict[str, float]: ...

    @property
    def variant(self) -> str: ...

    def set_variant(self, name: str): ...


@runtime_checkable
class AdapterHost(Protocol):
    """A model whose linear layers can carry named LoRA adapters (``snapgen.nn.lora``); ``adapter_names()``
    lists those it carries."""

    def adapter_names(self) -> list[str]: ...


class DenoiserMixin:
    """What every snapgen denoiser class shares: its parameter count and the AdapterHost capability."""

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def adapter_names(self) -> list[str]:
        """The LoRA adapters this model carries (:mod:`snapgen.nn.lora`)."""
        from ..nn.lora import adapter_names

        return adapter_names(self)


def is_supernet(model) -> bool:
    """An :class:`Elastic` model serving more than its full width."""
    return isinstance(model, Elastic) and len(model.variants) > 1


def text_cond(text: torch.Tensor, text_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The ``cond`` dict of a text-conditioned image model."""
    return {"text": text} if text_mask is None else {"text": text, "text_mask": text_mask}


def check_features(features: Sequence[str], taps: Sequence[str], family: str) -> tuple[str, ...]:
    features = (features,) if isinstance(features, str) else tuple(features)
    unknown = [f for f in features if f not in taps]
    if unknown:
        raise ValueError(f"{family} has no feature tap {unknown[0]!r}; it offers {list(taps)}")
    return features


def denoiser_call(cond, legacy: tuple, legacy_kw: dict, features: Sequence[str], stacklevel: int = 5):
    """Normalise a denoiser call to ``(cond dict, features, legacy_return)``.

    The pre-registry form ``model(x, t, text, text_mask[, return_features])`` (also with ``text=`` /
    ``text_mask=`` / ``return_features=`` keywords) still works, with a ``DeprecationWarning`` pointing at the
    caller; ``legacy_return`` is then True when the old ``(v, last_tokens)`` return shape was asked for."""
    legacy_return = bool(legacy_kw.pop("return_features", False))
    text_kw = {k: legacy_kw.pop(k) for k in ("text", "text_mask") if k in legacy_kw}
    if legacy_kw:
        raise TypeError(f"unexpected keyword arguments {sorted(legacy_kw)}; call model(x, t, cond, features=...) "
                        f"with cond a dict of tensors (e.g. {{'text': ..., 'text_mask': ...}})")
    features = (features,) if isinstance(features, str) else tuple(features)
    if torch.is_tensor(cond) or text_kw or legacy or legacy_return:
        if len(legacy) == 2 and isinstance(legacy[1], bool):  # model(x, t, text, mask, return_features)
            legacy, legacy_return = legacy[:1], legacy_return or legacy[1]
        if len(legacy) > 1:
            raise TypeError(f"too many positional arguments ({2 + 1 + len(legacy)}); the legacy form is "
                            f"model(x, t, text, text_mask)")
        if cond is not None and not torch.is_tensor(cond):
            if text_kw or legacy:
                raise TypeError("pass either a cond dict or the legacy text/text_mask arguments, not both")
        else:
            text = cond if cond is not None else text_kw.get("text")
            mask = legacy[0] if legacy else text_kw.get("text_mask")
            if text is None:
                raise TypeError("missing conditioning: call model(x, t, cond) with cond={'text': ...}")
            cond = text_cond(text, mask)
        # stacklevel 5: this function, forward, Module._call_impl, Module._wrapped_call_impl, the caller
        # (one more per helper between forward and this function)
        warnings.warn("model(x, t, text, text_mask[, return_features=True]) is deprecated; use "
                      "model(x, t, {'text': text, 'text_mask': text_mask}, features=('last',))",
                      DeprecationWarning, stacklevel=stacklevel)
        if legacy_return:
            features = features or ("last",)
    if cond is None:
        cond = {}
    if not isinstance(cond, Mapping):
        raise TypeError(f"cond must be a dict of tensors, got {type(cond).__name__}")
    return cond, features, legacy_return
