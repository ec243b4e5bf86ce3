"""Weighted mixtures of data sources, and building any source from a config dict.

:class:`MixedDataset` has a fixed ``length``; item ``i`` picks a source with probability proportional to
its weight and a uniformly random index into it, both from a generator seeded by ``(seed, i)``, so a
mixture is reproducible, needs no state, and works the same under any DataLoader worker split.

:func:`build_dataset` turns the ``data:`` section of a YAML training config into a dataset::

    {"type": "scenes", "resolution": 64, "length": 10000}
    {"type": "emoji", "resolution": 64, "split": "train"}
    {"type": "folder", "root": "my_images", "resolution": 64}
    {"type": "mixed", "length": 20000, "seed": 0, "resolution": 64, "sources": [
        {"type": "scenes", "weight": 3.0, "length": 10000},
        {"type": "emoji", "weight": 1.0, "name": "emoji", "split": "train"}]}

Inside ``mixed``, each source takes an optional ``weight`` (default 1.0) and ``name`` (default its type,
numbered when repeated); a ``resolution`` given on the mixture is passed to every source that does not
set its own, and sources must agree on it (a batch needs one image size).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .base import Sample

__all__ = ["DATASET_TYPES", "MixedDataset", "build_dataset"]


class MixedDataset(Dataset):
    """A fixed-length weighted mixture of datasets; ``meta["source"]`` becomes the source's name.

    Args:
        sources: ``{name: dataset}``, or a list of datasets (named ``"source0"``, ``"source1"``, ...).
        weights: one positive weight per source: a list in the same order, or a dict with the same
            names as ``sources``. Normalised to probabilities.
        length: the number of items.
        seed: mixes differently per seed; item ``i`` is fixed given ``(seed, i)``.

    The source's own ``meta["source"]`` (e.g. ``"emoji"``) is kept as ``meta["inner_source"]`` when it
    differs from the name, and ``meta["source_index"]`` records the index drawn from the source.
    """

    def __init__(self, sources: Mapping[str, Dataset] | Sequence[Dataset],
                 weights: Sequence[float] | Mapping[str, float], length: int, seed: int = 0):
        if isinstance(sources, Mapping):
            names = [str(k) for k in sources]
            datasets = list(sources.values())
        elif isinstance(sources, Sequence) and not isinstance(sources, (str, bytes)):
            datasets = list(sources)
            names = [f"source{i}" for i in range(len(datasets))]
        else:
            raise TypeError(f"sources must be a dict of name -> dataset or a list of datasets, "
                            f"got {type(sources).__name__}")
        if not datasets:
            raise ValueError("MixedDataset needs at least one source")

        if isinstance(weights, Mapping):
            if not isinstance(sources, Mapping):
                raise ValueError("weights given as a dict need sources given as a dict with the same names")
            missing, extra = set(names) - set(map(str, weights)), set(map(str, weights)) - set(names)
            if missing or extra:
                raise ValueError(f"weights must name exactly the sources {names}: "
                                 f"missing {sorted(missing)}, unknown {sorted(extra)}")
            w = [weights[k] for k in sources]  # type: ignore[index]
        elif isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)):
            w = list(weights)
        else:
            raise TypeError(f"weights must be a list or a dict of floats, got {type(weights).__name__}")
        if len(w) != len(datasets):
            raise ValueError(f"got {len(w)} weights for {len(datasets)} sources {names}")
        for name, value in zip(names, w):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ValueError(f"weight for source {name!r} must be a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"weight for source {name!r} must be positive and finite, got {value!r}")
        for name, ds in zip(names, datasets):
            if len(ds) == 0:  # type: ignore[arg-type]
                raise ValueError(f"source {name!r} is empty")
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")

        self.names, self.datasets = names, datasets
        total = float(sum(w))
        self.weights = [float(v) / total for v in w]
        self._cdf = np.cumsum(self.weights)
        self._cdf[-1] = 1.0
        self.length, self.seed = int(length), int(seed)

    def __len__(self) -> int:
        return self.length

    def locate(self, index: int) -> tuple[int, int]:
        """(source number, index into that source) for item ``index``."""
        n = self.length
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for MixedDataset of length {n}")
        index %= n
        rng = np.random.default_rng([self.seed, index])
        k = int(np.searchsorted(self._cdf, rng.random(), side="right"))
        k = min(k, len(self.datasets) - 1)
        return k, int(rng.integers(len(self.datasets[k])))  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Sample:
        k, j = self.locate(index)
        sample = self.datasets[k][j]
        meta = dict(sample.meta)
        inner = meta.get("source")
        if inner is not None and inner != self.names[k]:
            meta["inner_source"] = inner
        meta["source"] = self.names[k]
        meta["source_index"] = j
        return Sample(sample.image, sample.caption, meta)

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to every source that has ``set_epoch`` (e.g. emoji's random captions)."""
        for ds in self.datasets:
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(epoch)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {w:.3g}" for n, w in zip(self.names, self.weights))
        return f"MixedDataset({{{parts}}}, length={self.length}, seed={self.seed})"


# ------------------------------------------------------------------------------------------- building

def _scenes() -> type:
    from .scenes import SceneDataset
    return SceneDataset


def _emoji() -> type:
    from .emoji import EmojiDataset
    return EmojiDataset


def _folder() -> type:
    from .folder import ImageFolderDataset
    return ImageFolderDataset


DATASET_TYPES: dict[str, Callable[[], type]] = {"scenes": _scenes, "emoji": _emoji, "folder": _folder}
_MIXED_KEYS = ("type", "length", "seed", "sources", "resolution")


def _construct(cls: type, kind: str, kwargs: dict[str, Any]) -> Dataset:
    params = inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        valid = [n for n, p in params.items()
                 if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for dataset type {kind!r}; "
                             f"valid: {', '.join(valid)}")
        missing = [n for n in valid if params[n].default is inspect.Parameter.empty and n not in kwargs]
        if missing:
            raise ValueError(f"dataset type {kind!r} needs option(s) {missing}")
    return cls(**kwargs)


def _resolution_of(ds: Dataset, given: Any) -> tuple[int, int] | None:
    r = getattr(ds, "resolution", given)
    if isinstance(r, (int, np.integer)) and not isinstance(r, bool):
        return (int(r), int(r))
    if isinstance(r, (tuple, list)) and len(r) == 2:
        return (int(r[0]), int(r[1]))
    return None


def build_dataset(spec: Mapping[str, Any]) -> Dataset:
    """Build a data source from a config dict (see the module docstring for the format)."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"a dataset spec must be a dict with a 'type', got {type(spec).__name__}")
    spec = dict(spec)
    valid_types = sorted([*DATASET_TYPES, "mixed"])
    kind = spec.pop("type", None)
    if kind not in valid_types:
        raise ValueError(f"unknown dataset type {kind!r}; valid types: {', '.join(valid_types)}")
    if kind != "mixed":
        return _construct(DATASET_TYPES[kind](), kind, spec)

    unknown = sorted(set(spec) - set(_MIXED_KEYS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for dataset type 'mixed'; valid: {', '.join(_MIXED_KEYS)}")
    if "length" not in spec:
        raise ValueError("dataset type 'mixed' needs 'length' (the number of items)")
    children = spec.get("sources")
    if not isinstance(children, Sequence) or isinstance(children, (str, bytes)) or not children:
        raise ValueError("dataset type 'mixed' needs 'sources': a non-empty list of dataset specs, "
                         "each with a 'type' and optionally 'weight' and 'name'")
    resolution = spec.get("resolution")
    datasets: dict[str, Dataset] = {}
    weights: list[float] = []
    resolutions = []
    for i, child in enumerate(children):
        if not isinstance(child, Mapping):
            raise ValueError(f"mixed source {i} must be a dict with a 'type', got {type(child).__name__}")
        child = dict(child)
        weights.append(child.pop("weight", 1.0))
        name = str(child.pop("name", child.get("type", f"source{i}")))
        if name in datasets:
            base, n = name, 1
            while name in datasets:
                name, n = f"{base}{n}", n + 1
        if child.get("type") == "mixed":
            raise ValueError("nested 'mixed' sources are not supported; list their sources directly")
        if resolution is not None:
            child.setdefault("resolution", resolution)
        datasets[name] = build_dataset(child)
        resolutions.append((name, _resolution_of(datasets[name], child.get("resolution"))))
    known = {r for _, r in resolutions if r is not None}
    if len(known) > 1:
        raise ValueError(f"mixed sources must share one resolution, got "
                         f"{', '.join(f'{n}: {r}' for n, r in resolutions)}; set 'resolution' once on the mixture")
    return MixedDataset(datasets, weights, length=spec["length"], seed=spec.get("seed", 0))
