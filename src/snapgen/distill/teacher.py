"""The teacher interface of knowledge distillation (SnapGen++ Sec. 3.1) and K-DMD's real score (Sec. 3.2).

A :class:`Teacher` is a frozen denoiser in snapgen's convention (``docs/conventions.md``: ``t`` in [0, 1],
``t = 1`` noise, ``v = eps - x0``) that brings its own text side::

    cond = teacher.condition(captions, feats, drop)       # the teacher's own conditioning of the batch
    uncond = teacher.null_condition(B, like=cond)         # its unconditional branch (CFG), same shapes
    v = teacher(x_t, t, cond)                             # velocity, like any Denoiser
    v, f = teacher(x_t, t, cond, features=("last",))      # + feature taps, tokens on the student's grid
    v = teacher.velocity(x_t, t, cond, guidance=w, uncond=uncond)   # guided velocity (K-DMD's real score)

``captions`` are the batch's caption strings, ``feats`` the student encoder's cached features
``(tokens, mask)`` of the same captions and ``drop`` the caption dropout of the batch: a dropped caption is
dropped for the teacher too (it gets its own null condition). Each teacher reads what it needs:

* :class:`SnapgenTeacher` -- a snapgen pipeline's transformer with its trained text conditioning, fed the
  student encoder's features (the teacher and the student share one text encoder). This is what ``kd:`` and
  the dmd tasks used before teachers existed, unchanged.
* :class:`snapgen.distill.diffusers_teacher.DiffusersTeacher` -- an external diffusers transformer (SD3 /
  SD3.5, Flux, Qwen-Image) with its own text encoders, converted at the boundary.

Feature taps come back as ``(B, N, D)`` tokens in raster order on the grid ``(H / p, W / p)`` of the input
latent, ``p = feature_patch`` (the student's patch size): a teacher whose own token grid differs is resampled
by :func:`match_token_grid`, so ``L_feat`` compares the same image locations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..sampling import cfg_velocity

__all__ = ["Teacher", "SnapgenTeacher", "match_token_grid", "capture_outputs", "resolve_module"]


def match_token_grid(tokens: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> torch.Tensor:
    """``(B, h*w, D)`` raster-order tokens of an ``src_hw`` grid resampled to ``dst_hw``: the identity when they
    are equal; the mean of each ``k x l`` block when the source is an integer multiple (a patch-1 teacher seen
    by a patch-2 student: each student token gets the mean of the 2x2 teacher tokens it covers); otherwise
    bilinear, antialiased when shrinking."""
    src_hw, dst_hw = tuple(int(s) for s in src_hw), tuple(int(s) for s in dst_hw)
    B, N, D = tokens.shape
    if N != src_hw[0] * src_hw[1]:
        raise ValueError(f"{N} tokens do not form the {src_hw[0]}x{src_hw[1]} grid they are said to come from")
    if src_hw == dst_hw:
        return tokens
    grid = tokens.transpose(1, 2).reshape(B, D, *src_hw).float()
    if all(s % d == 0 for s, d in zip(src_hw, dst_hw)):
        out = F.avg_pool2d(grid, (src_hw[0] // dst_hw[0], src_hw[1] // dst_hw[1]))
    else:
        out = F.interpolate(grid, size=dst_hw, mode="bilinear", align_corners=False, antialias=True)
    return out.flatten(2).transpose(1, 2).to(tokens.dtype)


def resolve_module(root: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted ``path``; integer parts index lists and may be negative
    (``"transformer_blocks.-1"`` is the last block)."""
    module = root
    for part in str(path).split("."):
        try:
            if part.lstrip("-").isdigit() and isinstance(module, (nn.ModuleList, nn.Sequential)):
                module = module[int(part)]
            else:
                module = getattr(module, part) if part in module._modules else module.get_submodule(part)
        except (AttributeError, IndexError) as e:
            children = [n for n, _ in module.named_children()]
            raise ValueError(f"teacher has no module {path!r} (at {part!r}: {e}); its children there are "
                             f"{children[:12]}{' ...' if len(children) > 12 else ''}") from None
    return module


class capture_outputs:
    """Context manager: forward hooks on ``modules`` (name -> module) that keep each one's output,
    ``select(name, output)`` applied; ``.outputs[name]`` after the forward. The hooks go when the block ends."""

    def __init__(self, modules: dict[str, nn.Module], select: Callable | None = None):
        self.modules, self.select, self.outputs, self._handles = modules, select, {}, []

    def __enter__(self):
        for name, module in self.modules.items():
            def hook(_module, _inputs, output, name=name):
                self.outputs[name] = self.select(name, output) if self.select is not None else output
            self._handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False


class Teacher(nn.Module):
    """A frozen teacher in snapgen's flow convention (see the module docstring). Subclasses implement
    :meth:`forward`, :meth:`condition` and :meth:`null_condition` and set ``latent_channels`` (channels of the
    latent space it denoises), ``feature_width`` (channels of its ``"last"`` tap) and ``feature_patch``."""

    latent_channels: int
    feature_width: int
    feature_patch: int
    needs_captions = False   # conditions on caption strings (then every batch must carry them)

    def prepare_captions(self, captions: Sequence[str]) -> None:
        """Called once with the data's distinct captions (a teacher with its own text encoder encodes them)."""

    def condition(self, captions: Sequence[str] | None, feats: list[tuple[torch.Tensor, torch.Tensor]] | None,
                  drop: list[torch.Tensor] | None = None) -> dict:
        raise NotImplementedError

    def null_condition(self, batch_size: int, like: dict) -> dict:
        raise NotImplementedError

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: dict, guidance: float = 1.0,
                 uncond: dict | None = None) -> torch.Tensor:
        """The guided velocity ``v_u + w (v_c - v_u)`` (:func:`snapgen.sampling.cfg_velocity`)."""
        return cfg_velocity(self, x, t, cond, uncond, guidance)

    def features(self, x: torch.Tensor, t: torch.Tensor, cond: dict, taps: Sequence[str] = ("last",)):
        """``(v, {tap: (B, N, D) tokens on the (H / feature_patch, W / feature_patch) grid})``."""
        return self(x, t, cond, features=tuple(taps))


class SnapgenTeacher(Teacher):
    """A snapgen Denoiser and its text conditioning (``TextConditioning``) as a teacher.

    ``condition`` runs the teacher's own conditioning on the student encoder's features with the batch's caption
    drops (teacher and student share the text encoder); ``null_condition`` is its learned null embedding padded
    to the conditional batch's length. ``variant`` (for an elastic teacher) is set before every call. The
    wrapped modules are used as given (freezing them is the caller's: the dmd tasks' teacher is the shared
    base model that also carries the students' adapters).
    """

    def __init__(self, model: nn.Module, conditioning: nn.Module, variant: str | None = None,
                 feature_patch: int | None = None):
        super().__init__()
        self.model, self.conditioning, self.variant = model, conditioning, variant
        cfg = getattr(model, "config", None)
        self.latent_channels = int(getattr(cfg, "in_channels", 0))
        self.feature_width = int(getattr(cfg, "width", 0))
        self.patch = int(getattr(cfg, "patch_size", 1))
        self.feature_patch = int(feature_patch or self.patch)
        self.encoder_dims = list(getattr(conditioning, "encoder_dims", []))

    def condition(self, captions, feats, drop=None) -> dict:
        if feats is None:
            raise ValueError("a snapgen teacher reads the student encoder's caption features; the batch has none")
        feats = [feats] if isinstance(feats, tuple) else list(feats)  # one (tokens, mask) pair, or one per encoder
        text, mask = self.conditioning(feats, drop=drop)
        return {"text": text, "text_mask": mask}

    def null_condition(self, batch_size: int, like: dict) -> dict:
        L = like["text"].shape[1]
        if self.conditioning.num_encoders == 1:
            null, mask = self.conditioning.null(batch_size, lengths=[L])
        else:  # the all-null condition right-padded to the batch's length (padding is masked out)
            null, mask = self.conditioning.null(batch_size)
            null = torch.nn.functional.pad(null, (0, 0, 0, L - null.shape[1]))
            mask = torch.nn.functional.pad(mask, (0, L - mask.shape[1]), value=False)
        return {"text": null, "text_mask": mask}

    def forward(self, x, t, cond, *, features=()):
        if self.variant is not None:
            self.model.set_variant(self.variant)
        if not features:
            return self.model(x, t, cond)
        v, f = self.model(x, t, cond, features=tuple(features))
        if self.feature_patch != self.patch:
            H, W = x.shape[-2:]
            src, dst = (H // self.patch, W // self.patch), (H // self.feature_patch, W // self.feature_patch)
            f = {k: match_token_grid(val, src, dst) for k, val in f.items()}
        return v, f
