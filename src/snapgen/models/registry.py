"""The model registry: every denoiser family registers once; everything else builds and loads through it.

::

    @register_model("three_stage_dit", config=ThreeStageDiTConfig, presets=PRESETS, namespace="snapgenpp")
    class ThreeStageDiT(...): ...

    build_model("snapgenpp/small")                 # a namespaced preset (model_names() lists them)
    build_model("small")                           # a bare preset name, when it is unambiguous
    build_model(ThreeStageDiTConfig(...))          # a config object: its family's model
    build_model({"preset": "micro", "width": 128}) # a YAML ``model:`` section (``family:`` optional)
    load_model("runs/x/final/transformer")         # dispatches on config.json's ``_class_name``

Folder formats other than ``config.json`` + ``model.safetensors`` (k-means quantized weights) register a
loader with :func:`register_folder_loader`; :mod:`snapgen.compress.quantize` does, and ``import snapgen``
imports it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..nn.hub import resolve_pretrained
from ..registry import Registry, UnknownName

__all__ = ["MODELS", "register_model", "build_model", "load_model", "model_names", "resolve_config",
           "register_folder_loader", "family_of", "saved_class"]

MODELS: Registry[type] = Registry("model family")
_CLASS_NAMES: dict[str, str] = {}           # class name saved in config.json -> family
_CONFIG_FAMILY: dict[type, str] = {}        # config class -> the family it builds by default
_FOLDER_LOADERS: list[tuple[str, Callable]] = []   # (marker file, loader(folder) -> model)
SECTION_KEYS = ("family", "preset")        # keys of a YAML model: section that are not config fields
DEFAULT_FAMILY = "three_stage_dit"         # a model: section without family or preset


def register_model(family: str, *, config: type, presets: dict | None = None, namespace: str | None = None,
                   default_for_config: bool = True):
    """Class decorator: register ``family`` (sets ``cls.family``). ``presets``: name -> config, offered as
    ``namespace/name`` (and bare ``name`` where no other family has it). ``default_for_config``: a config
    object of this class builds this family (the isotropic baseline shares the three-stage config and says
    False)."""

    def add(cls):
        cls.family = family
        MODELS.register(family, cls, config=config, presets=dict(presets or {}), namespace=namespace or family)
        _CLASS_NAMES[cls.__name__] = family
        if default_for_config:
            _CONFIG_FAMILY.setdefault(config, family)
        return cls

    return add


def register_folder_loader(marker: str, loader: Callable) -> None:
    """Folders holding file ``marker`` are loaded by ``loader(folder)`` (e.g. ``quantized.safetensors``)."""
    if not any(m == marker for m, _ in _FOLDER_LOADERS):
        _FOLDER_LOADERS.append((marker, loader))


def model_names() -> list[str]:
    """Every preset as ``namespace/name`` (CLI choices). A family's own name also works as a namespace
    (``three_stage_dit/small``) and, alone, builds its default config."""
    out = []
    for family, _ in MODELS.items():
        meta = MODELS.meta(family)
        out += [f"{meta['namespace']}/{p}" for p in meta["presets"]]
    return sorted(out)


def _bare_presets() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for family, _ in MODELS.items():
        for p in MODELS.meta(family)["presets"]:
            found.setdefault(p, []).append(family)
    return found


def _lookup_preset(name: str) -> tuple[str, object]:
    if "/" in name:
        ns, p = name.split("/", 1)
        for family, _ in MODELS.items():
            meta = MODELS.meta(family)
            if ns in (meta["namespace"], family) and p in meta["presets"]:
                return family, meta["presets"][p]
        raise UnknownName(f"unknown model preset {name!r}; known: {', '.join(model_names())}")
    families = _bare_presets().get(name, [])
    if len(families) == 1:
        return families[0], MODELS.meta(families[0])["presets"][name]
    if len(families) > 1:
        raise UnknownName(f"preset {name!r} is ambiguous ({', '.join(families)}); write it with its namespace, "
                          f"e.g. {MODELS.meta(families[0])['namespace']}/{name}")
    if name in MODELS:
        return name, MODELS.meta(name)["config"]()
    raise UnknownName(f"unknown model preset {name!r}; known: {', '.join(model_names())}")


def family_of(config) -> str:
    try:
        return _CONFIG_FAMILY[type(config)]
    except KeyError:
        raise UnknownName(f"no model family is registered for config class {type(config).__name__}; known "
                          f"families: {', '.join(MODELS.names())}") from None


def resolve_config(spec) -> tuple[str, object]:
    """``(family, config)`` of a preset name, a config object or a YAML ``model:`` dict (``family``/``preset``
    plus config fields that override the preset's; other keys are errors naming the valid ones)."""
    if isinstance(spec, str):
        return _lookup_preset(spec)
    if isinstance(spec, Mapping):
        d = dict(spec)
        family, name = d.pop("family", None), d.pop("preset", None)
        if family is not None:
            MODELS.get(family)  # an unknown family is an error naming the known ones
        if name is not None:
            own = f"{MODELS.meta(family)['namespace']}/{name}" if family is not None and "/" not in name else None
            found, base = _lookup_preset(own if own in model_names() else name)
            if family is not None and found != family:
                # families that share a config class share its presets (the isotropic baseline of a DiT)
                if MODELS.meta(found)["config"] is not MODELS.meta(family)["config"]:
                    raise ValueError(f"preset {name!r} belongs to family {found!r}, whose config does not build "
                                     f"{family!r}")
            family = family or found
        else:
            family = family or DEFAULT_FAMILY
            base = MODELS.meta(family)["config"]()
        return family, _replace(base, d)
    return family_of(spec), spec


def _replace(config, fields: dict):
    """``config`` with ``fields`` replaced; an unknown field is an error naming the valid ones."""
    if not fields:
        return config
    valid = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(fields) - valid)
    if unknown:
        raise ValueError(f"unknown {type(config).__name__} keys {unknown} in the model spec; valid keys are "
                         f"{sorted(valid | set(SECTION_KEYS))}")
    return config.replace(**fields)


def build_model(spec, device: torch.device | str | None = None, **overrides) -> torch.nn.Module:
    """A freshly initialised model from a preset name, a config object or a YAML ``model:`` dict.
    ``overrides`` replace config fields. Works under ``torch.device("meta")``."""
    family, config = resolve_config(spec)
    config = _replace(config, overrides)
    model = MODELS.get(family)(config)
    return model.to(device) if device is not None else model


def _class_name(folder: Path, config_file: str = "config.json") -> str | None:
    try:
        return json.loads((folder / config_file).read_text()).get("_class_name")
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{folder / config_file} is not a valid model config ({e}); the file is corrupt") from None


def saved_class(folder: str | os.PathLike, config_file: str = "config.json") -> tuple[type, object]:
    """``(model class, config)`` of a saved model folder, from its ``config.json``'s ``_class_name``."""
    folder = Path(folder)
    if not (folder / config_file).is_file():
        raise FileNotFoundError(f"{folder / config_file} not found (a model folder holds config.json and "
                                f"model.safetensors, as written by save_pretrained)")
    name = _class_name(folder, config_file)
    if name is None:  # a hand-written or foreign config.json: the default family, as before the registry
        name = MODELS.get(DEFAULT_FAMILY).__name__
    if name not in _CLASS_NAMES:
        raise UnknownName(f"{folder} holds a {name!r}, which is not a registered model family (known classes: "
                          f"{', '.join(sorted(_CLASS_NAMES))}); is it a model folder of another kind?")
    cls = MODELS.get(_CLASS_NAMES[name])
    return cls, cls.config_class.from_json(folder / config_file)


def load_model(folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """The model saved in ``folder``, of whichever registered family its ``config.json`` names; ``folder`` may
    be a Hugging Face Hub id holding such a folder (:func:`snapgen.nn.hub.resolve_pretrained`)."""
    folder = resolve_pretrained(folder, "model", "a folder written by save_pretrained, holding config.json and "
                                                 "model.safetensors")
    for marker, loader in _FOLDER_LOADERS:
        if (folder / marker).is_file():
            return loader(folder).to(map_location)
    cls, _ = saved_class(folder)
    return cls.from_pretrained(folder, map_location=map_location)
