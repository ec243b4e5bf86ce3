"""Combine the few-step adapters of several distilled pipelines into one folder.

A distilled pipeline is a frozen base model plus one LoRA adapter per elastic variant (``pipeline.json``'s
``adapters``: variant -> adapter file). Runs that start from the same base weights can therefore be mixed:
e.g. the full width's adapter from one K-DMD run and tiny/small's from another run with other settings.
This is how the shipped model is assembled (``make distill``). The result is a normal distilled pipeline;
nothing is retrained.

Checks, each with an error naming the fix: every source is a distilled pipeline folder, their base weights
(transformer, VAE, text conditioning) are equal tensor for tensor, their few-step samplers agree, every
requested variant has an adapter in its source, and two different adapters never share a file name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

__all__ = ["combine_adapters", "parse_source"]

# what makes up the frozen base of a pipeline folder (must be equal across sources)
_BASE = ("transformer", "vae", "text_conditioning.safetensors")
_SAMPLER_KEYS = ("resolution", "steps", "guidance", "shift", "sampler", "few_step_times", "base_sampling",
                 "text_encoder", "text_max_length", "conditioning")


def parse_source(spec: str) -> tuple[Path, list[str] | None]:
    """``DIR`` (all its variants) or ``DIR:tiny,small`` (only those)."""
    folder, sep, variants = spec.rpartition(":")
    if not sep or not variants or "/" in variants:  # no variant list (or a ':' inside the path itself)
        return Path(spec), None
    return Path(folder), [v.strip() for v in variants.split(",") if v.strip()]


def _read_config(folder: Path) -> dict:
    path = folder / "pipeline.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a snapgen pipeline folder (pipeline.json is missing)")
    config = json.loads(path.read_text())
    if not config.get("adapters"):
        raise ValueError(f"{folder} is not a distilled pipeline (pipeline.json has no adapters); pass the "
                         f"final/ folder of a `snapgen distill dmd|kdmd` run")
    return config


def _files(path: Path) -> dict[str, Path]:
    if path.is_file():
        return {"": path}
    return {str(f.relative_to(path)): f for f in sorted(path.rglob("*")) if f.is_file()} if path.is_dir() else {}


def _same(a: Path, b: Path) -> bool:
    """Same files; safetensors compared tensor for tensor (a re-save with other metadata still matches)."""
    fa, fb = _files(a), _files(b)
    if not fa or fa.keys() != fb.keys():
        return False
    for rel, x in fa.items():
        y = fb[rel]
        if x.read_bytes() == y.read_bytes():
            continue
        if x.suffix != ".safetensors":
            return False
        sa, sb = load_file(str(x)), load_file(str(y))
        if sa.keys() != sb.keys() or not all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


def combine_adapters(sources: list[tuple[str | os.PathLike, list[str] | None]], out: str | os.PathLike) -> Path:
    """Write a distilled pipeline to ``out`` whose variant ``v`` uses the adapter that the source listing ``v``
    gives it (later sources win where two list the same variant). Returns ``out``."""
    if not sources:
        raise ValueError("no source pipelines given")
    folders = [Path(f) for f, _ in sources]
    configs = [_read_config(f) for f in folders]
    first, first_cfg = folders[0], configs[0]
    for folder, cfg in zip(folders[1:], configs[1:]):
        for rel in _BASE:
            if not _same(first / rel, folder / rel):
                raise ValueError(f"{folder}/{rel} differs from {first}/{rel}: adapters can only be combined when "
                                 f"every run was distilled from the same base model (same init_from)")
        for key in _SAMPLER_KEYS:
            if cfg.get(key) != first_cfg.get(key):
                raise ValueError(f"{folder} and {first} sample differently ({key}: {cfg.get(key)!r} vs "
                                 f"{first_cfg.get(key)!r}); distil them with the same steps / shift / sampler")
    adapters: dict[str, str] = {}
    files: dict[str, Path] = {}
    for (folder, wanted), cfg in zip(((Path(f), w) for f, w in sources), configs):
        chosen = cfg["adapters"] if wanted is None else {}
        for v in wanted or []:
            if v not in cfg["adapters"]:
                raise ValueError(f"{folder} has no adapter for variant {v!r} (it has {sorted(cfg['adapters'])})")
            chosen[v] = cfg["adapters"][v]
        for v, name in chosen.items():
            path = folder / "adapters" / f"{name}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: {folder}/pipeline.json lists adapter {name!r}")
            if name in files and files[name] != path and files[name].read_bytes() != path.read_bytes():
                raise ValueError(f"two different adapters are named {name!r} ({files[name]} and {path}); give "
                                 f"one run another distill.adapter_prefix")
            files[name] = path
            adapters[v] = name
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for rel in _BASE:
        (shutil.copytree if (first / rel).is_dir() else shutil.copy2)(first / rel, tmp / rel)
    (tmp / "adapters").mkdir()
    for name in sorted(set(adapters.values())):
        shutil.copy2(files[name], tmp / "adapters" / f"{name}.safetensors")
    config = {**first_cfg, "adapters": dict(sorted(adapters.items()))}
    (tmp / "pipeline.json").write_text(json.dumps(config, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
