"""Saving and loading models as ``config.json`` + ``model.safetensors`` (never pickle), with a ``README.md``
model card (:mod:`snapgen.nn.card`); loading takes a folder or a Hugging Face Hub id (:mod:`snapgen.nn.hub`).

Writes are atomic (temporary file + ``os.replace``), so an interrupted save never leaves a half-written
model folder behind; loads check every file and name the problem and the fix.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .hub import resolve_pretrained

__all__ = ["ModelIOMixin", "CONFIG_NAME", "WEIGHTS_NAME", "atomic_save_safetensors"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class ModelIOMixin:
    """``save_pretrained(dir)`` / ``from_pretrained(dir)`` for modules built from ``self.config``.

    Subclasses set ``config_class`` (with ``to_json``/``from_json``) and take the config as their only
    constructor argument.
    """

    config_class = None

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None,
                        model_card: bool = True) -> Path:
        """Write ``config.json`` + ``model.safetensors`` and, with ``model_card``, a ``README.md`` model card
        (:mod:`snapgen.nn.card`). ``dtype`` (e.g. ``torch.float16``) casts floating tensors for a smaller
        file; ``from_pretrained`` always loads into the model's own dtype."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # LoRA adapters are not part of the model: they are saved beside it (snapgen.nn.lora.save_lora)
        state = {k: v for k, v in self.state_dict().items() if ".lora." not in k}
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        # Tied/shared tensors are not expected here; safetensors refuses them, which is what we want.
        atomic_save_safetensors(state, directory / WEIGHTS_NAME, metadata={"format": "pt"})
        tmp = directory / f".{CONFIG_NAME}.tmp"
        self.config.to_json(tmp, class_name=type(self).__name__)  # load_model dispatches on it
        os.replace(tmp, directory / CONFIG_NAME)
        if model_card:
            from .card import module_card_sections, write_model_card

            intro, sections, tags = module_card_sections(self, dtype)
            write_model_card(directory, type(self).__name__, intro, sections, tags)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu"):
        """Load a folder written by :meth:`save_pretrained`, or a Hugging Face Hub id holding one
        (:func:`snapgen.nn.hub.resolve_pretrained`: the cache first, then a download unless offline)."""
        directory = resolve_pretrained(directory, "model", f"a folder written by save_pretrained, holding "
                                                           f"{CONFIG_NAME} and {WEIGHTS_NAME}")
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}; the folder is incomplete "
                                    f"(re-run save_pretrained, or check the path)")
        config = cls.config_class.from_json(directory / CONFIG_NAME)
        try:
            state = load_file(str(weights), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"cannot read weights {weights}: {e}. The file is corrupt or truncated; "
                             f"re-download or re-save it") from None
        model = cls(config)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"weights in {weights} do not match its config: {len(missing)} missing tensors "
                             f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). "
                             f"The weights were saved from a different model/config")
        bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items() if state[k].shape != v.shape]
        if bad:
            k, got, want = bad[0]
            raise ValueError(f"weights in {weights} do not match its config: {len(bad)} tensors have the wrong "
                             f"shape, e.g. {k}: file {got} vs config {want}")
        model.load_state_dict(state, strict=True)
        return model.to(map_location)


def read_safetensors(path: str | os.PathLike, expected_format: str, what: str) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a safetensors file whose metadata ``format`` must be ``expected_format``;
    errors name the file and the problem (missing, corrupt, another kind of file)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read {what} {path}: {e}. The file is corrupt or truncated") from None
    if meta.get("format") != expected_format:
        raise ValueError(f"{path} is not a {what} (metadata format={meta.get('format')!r}, "
                         f"expected {expected_format!r})")
    return tensors, meta

