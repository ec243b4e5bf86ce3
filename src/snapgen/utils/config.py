"""Frozen-dataclass configs saved as JSON: one implementation for every model and trainer config.

Tuples survive the JSON round trip (lists are turned back into tuples for fields annotated as tuples);
unknown or missing keys are errors that say what is valid, so a config written for another class or by
another version fails loudly instead of silently building a different model.
"""

from __future__ import annotations

import dataclasses
import json
import os

__all__ = ["JSONConfigMixin"]


class JSONConfigMixin:
    """Mixin for frozen dataclasses. ``_config_kind`` names the class in files and messages."""

    _config_kind: str = "config"
    _optional_keys: tuple[str, ...] = ()   # fields that may be missing in older files (take their default)

    def _tuplify(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list) and str(f.type).startswith("tuple"):
                object.__setattr__(self, f.name, tuple(v))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict):
        name = cls.__name__
        d = {k: v for k, v in d.items() if not k.startswith("_")}  # "_class_name", "_snapgen_version": metadata
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(d) - names), sorted(names - set(d) - set(cls._optional_keys))
        if unknown:
            raise ValueError(f"unknown {name} keys {unknown}; valid keys are {sorted(names)}. "
                             f"Was this config written by a newer snapgen, or for another model class?")
        if missing:
            raise ValueError(f"{name} is missing keys {missing}; a saved config must list every "
                             f"field (re-save it with save_pretrained, or add the keys)")
        return cls(**d)

    def to_json(self, path: str | os.PathLike, class_name: str | None = None) -> None:
        """Write the config; ``_class_name`` is ``class_name`` (the model class, which
        ``snapgen.models.load_model`` dispatches on) or the config's ``_config_kind``."""
        from .._version import __version__

        payload = {"_class_name": class_name or self._config_kind, "_snapgen_version": __version__, **self.to_dict()}
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike):
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{cls._config_kind} config not found: {path} (a model folder holds "
                                    f"config.json and model.safetensors, as written by save_pretrained)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"config {path} is not valid JSON ({e}); the file is corrupt") from None
        if not isinstance(d, dict):
            raise ValueError(f"config {path} must hold a JSON object, got {type(d).__name__}")
        return cls.from_dict(d)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
