"""Where a pretrained model lives: a local folder, or a Hugging Face Hub id through ``huggingface_hub``.

Every ``from_pretrained`` / ``load_model`` / ``load_autoencoder`` / ``TextToImagePipeline.from_pretrained``
starts with :func:`resolve_pretrained`, so each accepts either

* a folder (``str`` or ``os.PathLike``) that exists: used as it is, never looked up anywhere else; or
* a Hub id (``"org/name"`` or ``"name"``, optionally ``"org/name@revision"``): the snapshot in the Hugging
  Face cache (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``) is used when it is there, without any
  network access; otherwise ``huggingface_hub.snapshot_download`` downloads it, unless ``HF_HUB_OFFLINE=1``
  (huggingface_hub reads that variable itself; snapgen sets and reads none).

A name that is neither is a ``FileNotFoundError`` that names both possibilities and how to download.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["resolve_pretrained", "is_hub_id"]

# huggingface_hub's rules (validate_repo_id): "name" or "namespace/name", [A-Za-z0-9_.-], at most 96 chars, no
# leading/trailing "-" or ".", no "--" / "..", not ending in ".git"; plus snapgen's optional "@revision".
_ID = re.compile(r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?/)?[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_REVISION = re.compile(r"[A-Za-z0-9_./-]{1,200}")


def _split_id(name: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``name`` can be a Hub id, else ``None``."""
    repo, at, revision = name.partition("@")
    if at and not revision:
        return None
    if not repo or len(repo) > 96 or not _ID.fullmatch(repo) or "--" in repo or ".." in repo \
            or repo.endswith(".git"):
        return None
    if revision and not _REVISION.fullmatch(revision):
        return None
    return repo, (revision or None)


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether ``name`` has the form of a Hub id (``org/name``, ``name``, ``org/name@revision``)."""
    return _split_id(os.fspath(name)) is not None


def resolve_pretrained(path_or_id: str | os.PathLike, what: str = "model",
                       expected: str = "a folder written by save_pretrained") -> Path:
    """The local folder of ``path_or_id``: the folder itself, or a Hub id's snapshot (cache first, then a
    download unless ``HF_HUB_OFFLINE`` is set). ``what`` / ``expected`` word the error when it is neither."""
    if not isinstance(path_or_id, (str, os.PathLike)):
        raise TypeError(f"{what} must be a folder path or a Hugging Face Hub id (str), got "
                        f"{type(path_or_id).__name__}")
    name = os.fspath(path_or_id)
    if not name:  # Path("") is the working directory: never what an empty setting meant
        raise FileNotFoundError(f"{what} folder not found: the path is empty (expected {expected})")
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise FileNotFoundError(f"{what} {name} is a file, not a folder; pass {expected}")
    parts = _split_id(name)
    if parts is None:  # a path that does not exist and cannot be a Hub id (absolute, ./, ~, a/b/c...)
        raise FileNotFoundError(f"{what} folder not found: {name} (expected {expected})")
    repo, revision = parts
    from huggingface_hub import constants, snapshot_download

    try:  # the cache first: no network, whatever HF_HUB_OFFLINE says
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - huggingface_hub's "not in the cache" errors differ between versions
        pass
    try:  # then the Hub, unless offline (huggingface_hub refuses by itself when HF_HUB_OFFLINE=1)
        return Path(snapshot_download(repo, revision=revision))
    except Exception as e:  # noqa: BLE001 - offline, not found, gated, no network: all end in the same advice
        lines = str(e).strip().splitlines()
        reason = f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]
    rev = f" --revision {revision}" if revision else ""
    offline = ("; HF_HUB_OFFLINE is set, so nothing is downloaded: unset it to let loading download"
               if constants.HF_HUB_OFFLINE else "")
    raise FileNotFoundError(
        f"{what} {name!r} not found: it is not a local folder, and as a Hugging Face Hub id it is neither in the "
        f"cache ({constants.HF_HUB_CACHE}) nor downloadable now ({reason}). Pass {expected}, or download the Hub "
        f"id once with network access (`hf download {repo}{rev}`){offline}. HF_HUB_CACHE sets the cache folder")
