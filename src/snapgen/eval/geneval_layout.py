"""GenEval's image-folder layout, both ways (issue 20 §4): write a model's samples for any GenEval metadata file,
and read any folder in that layout back for SceneEval.

The layout (GenEval's ``generation/`` scripts write it and ``evaluation/evaluate_images.py`` reads it)::

    DIR/00000/metadata.jsonl      the prompt's metadata line (one JSON object), as in the metadata file
    DIR/00000/samples/0000.png    sample 0 of prompt 0
    DIR/00000/samples/0001.png    ...
    DIR/00001/...

Folder ``i`` is line ``i`` of the metadata file (blank lines skipped). GenEval's optional ``grid.png`` is not
written. Sample ``k`` is generated with seed ``base_seed + k`` one image per call, so it is the image ``snapgen
generate PROMPT --seed base_seed+k`` draws, whatever else is generated and in whichever order (a resumed run writes
the same images as an uninterrupted one). Sample files keep GenEval's numbering (``0000.png`` is sample 0 whatever
the base seed); the base seed is recorded beside the folders in ``DIR/snapgen_layout.json`` (``{"base_seed": B}``,
a file GenEval's evaluator does not read), and :func:`read_layout` reports sample ``k``'s seed as ``B + k`` -- so a
layout written with ``--seed 100`` is paired by ``snapgen eval --compare`` with other runs on seeds 100, 101, ....
A folder without that file (any other tool's) has seeds = sample indices.

Writing is resumable: existing samples are kept (not regenerated), and every file is written to a temporary name
in the same folder and renamed into place, so an interrupted run leaves no half-written PNG or metadata file.
Generation accepts any GenEval metadata (its classes need not be scene classes: only ``prompt`` is read);
reading for SceneEval (:func:`read_layout`) validates every folder's metadata against the scene world with
:func:`snapgen.eval.sceneeval.validate_metadata` and names the first folder and class it cannot score.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from PIL import Image

__all__ = ["read_geneval_metadata", "write_layout", "write_images", "read_layout", "sample_name", "folder_name",
           "LAYOUT_FILE"]

LAYOUT_FILE = "snapgen_layout.json"  # {"base_seed": B}: sample k of every folder was drawn with seed B + k


def folder_name(index: int) -> str:
    return f"{index:05d}"


def sample_name(index: int) -> str:
    return f"{index:04d}.png"


def read_geneval_metadata(path: str | os.PathLike) -> list[dict]:
    """Every non-blank line of a GenEval metadata JSONL file, as dicts; each must carry a non-empty ``prompt``
    (nothing else is checked: any GenEval metadata file can be generated)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GenEval metadata file not found: {path}")
    from ..utils.jsonl import read_jsonl

    out = []
    for where, meta in read_jsonl(path):
        if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str) or not meta["prompt"].strip():
            raise ValueError(f"{where}: a GenEval metadata line is a JSON object with a non-empty 'prompt'")
        out.append(meta)
    return out


def _atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    write(tmp)
    os.replace(tmp, target)


def _base_seed(directory: Path) -> int | None:
    """The base seed recorded in ``directory/snapgen_layout.json``, or None when the file is absent."""
    f = directory / LAYOUT_FILE
    if not f.is_file():
        return None
    try:
        seed = json.loads(f.read_text(encoding="utf-8")).get("base_seed")
    except (json.JSONDecodeError, AttributeError):
        seed = None
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"{f}: expected {{\"base_seed\": <integer>}} (delete it if the samples' seeds are their "
                         f"indices)")
    return seed


def write_layout(generate: Callable[[str, int], Image.Image], metadata: list[dict], outdir: str | os.PathLike,
                 n_samples: int, base_seed: int = 0, progress: bool = True) -> dict:
    """Write GenEval's layout for ``metadata`` under ``outdir``: ``generate(prompt, seed) -> PIL image`` is called
    for every missing sample (sample ``k`` with seed ``base_seed + k``). Returns ``{"generated", "skipped",
    "folders"}``. A folder whose metadata.jsonl holds another prompt's metadata is an error (a different
    metadata file was generated into ``outdir`` before)."""
    from tqdm.auto import tqdm

    if n_samples < 1:
        raise ValueError(f"--n-samples must be >= 1, got {n_samples}")
    outdir = Path(outdir)
    old_base = _base_seed(outdir) if outdir.is_dir() else None
    if old_base is None and outdir.is_dir() and any(outdir.glob("*/samples/*.png")):
        old_base = 0  # samples without a record (snapgen eval --save-images, older layouts): seeds = indices
    if old_base is not None and old_base != base_seed:
        raise ValueError(f"{outdir} holds samples drawn with --seed {old_base}, not {base_seed}: resume with "
                         f"--seed {old_base} or use an empty --outdir")
    todo = []
    for i, meta in enumerate(metadata):
        folder = outdir / folder_name(i)
        meta_file = folder / "metadata.jsonl"
        if meta_file.exists():
            old = json.loads(meta_file.read_text(encoding="utf-8"))
            if old != meta:
                raise ValueError(f"{meta_file} holds the metadata of another prompt ({old.get('prompt')!r}, not "
                                 f"{meta['prompt']!r}): use an empty --outdir for another metadata file")
        todo += [(i, k) for k in range(n_samples) if not (folder / "samples" / sample_name(k)).exists()]
    skipped = len(metadata) * n_samples - len(todo)
    outdir.mkdir(parents=True, exist_ok=True)
    if not (outdir / LAYOUT_FILE).exists():
        _atomic_write(outdir / LAYOUT_FILE, lambda p: p.write_text(json.dumps({"base_seed": base_seed}) + "\n"))
    for i, meta in enumerate(metadata):
        folder = outdir / folder_name(i)
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        for stale in (*folder.glob(".*.tmp"), *(folder / "samples").glob(".*.tmp")):  # left by a killed run
            stale.unlink()
        if not (folder / "metadata.jsonl").exists():
            _atomic_write(folder / "metadata.jsonl",
                          lambda p, m=meta: p.write_text(json.dumps(m, ensure_ascii=False) + "\n", encoding="utf-8"))
    for i, k in tqdm(todo, desc="generating", disable=not progress):
        image = generate(metadata[i]["prompt"], base_seed + k)
        _atomic_write(outdir / folder_name(i) / "samples" / sample_name(k), lambda p: image.save(p, format="PNG"))
    return {"generated": len(todo), "skipped": skipped, "folders": len(metadata)}


def require_empty(outdir: str | os.PathLike) -> Path:
    """``outdir`` as a Path if it is new or empty, else a ``ValueError`` (``--images`` would read old samples
    beside the new ones)."""
    outdir = Path(outdir)
    if outdir.is_dir() and any(outdir.iterdir()):
        raise ValueError(f"--save-images {outdir} is not empty: give an empty or new folder (its images would be "
                         f"re-scored together with what is there)")
    return outdir


def write_images(images, metadata: list[dict], cells: list[tuple[int, int]], outdir: str | os.PathLike) -> Path:
    """Save images already generated (``snapgen eval --save-images``) in the layout: image ``i`` goes to
    ``outdir/<prompt_index>/samples/<seed>.png`` for ``cells[i] = (prompt_index, seed)``, so ``snapgen eval
    --images outdir`` re-scores exactly these images (PNG is lossless) on the same cells, for instance with another
    detector. Atomic writes; the folder must be empty or new (a ``ValueError`` otherwise, before anything is
    generated by ``snapgen eval``), so nothing stale is read back with the run's images."""
    outdir = require_empty(outdir)
    for image, meta, (i, seed) in zip(images, metadata, cells, strict=True):
        folder = outdir / folder_name(i)
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        _atomic_write(folder / "metadata.jsonl",
                      lambda p, m=meta: p.write_text(json.dumps(m, ensure_ascii=False) + "\n", encoding="utf-8"))
        _atomic_write(folder / "samples" / sample_name(seed), lambda p, im=image: im.save(p, format="PNG"))
    return outdir


def read_layout(directory: str | os.PathLike, validate: bool = True) -> list[dict]:
    """Every sample of a GenEval-layout folder: ``[{"prompt_index", "seed", "path", "metadata"}]`` in folder then
    sample order; ``seed`` is the sample index (the PNG's number) plus the base seed of ``snapgen_layout.json``
    (0 without it), ``prompt_index`` the folder's. With
    ``validate`` every folder's metadata is checked for SceneEval (scene classes, colours, tags), and the first
    one it cannot score raises ``ValueError`` naming the folder."""
    from .sceneeval import validate_metadata

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"image folder not found: {directory}")
    base = _base_seed(directory) or 0
    folders = sorted((p for p in directory.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not folders:
        raise ValueError(f"{directory} is not in GenEval's layout: no numbered prompt folders (00000/metadata.jsonl, "
                         f"00000/samples/0000.png, ...); write one with snapgen generate --geneval-metadata")
    out = []
    for folder in folders:
        meta_file = folder / "metadata.jsonl"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} is missing (GenEval's layout has one per prompt folder)")
        lines = [ln for ln in meta_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
        where = f"{meta_file} (prompt folder {folder.name})"
        try:
            meta = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
        if meta is None:
            raise ValueError(f"{where}: empty metadata file")
        if validate:
            try:
                meta = validate_metadata(meta, where)
            except ValueError as e:
                raise ValueError(f"{e} (SceneEval scores only the scene world's classes, colours and GenEval's six "
                                 f"tags; score other classes with the official GenEval evaluator)") from None
        samples = sorted((p for p in (folder / "samples").glob("*.png") if p.stem.isdigit()), key=lambda p: int(p.stem))
        if not samples:
            raise ValueError(f"{folder / 'samples'}: no samples (0000.png, 0001.png, ...)")
        out += [{"prompt_index": int(folder.name), "seed": base + int(p.stem), "path": p, "metadata": meta} for p in samples]
    return out
