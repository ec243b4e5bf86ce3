"""Where shipped weights live: an environment variable if set, else a folder of the repository."""

from __future__ import annotations

__all__ = ["REPO_ROOT", "shipped_dir"]

from pathlib import Path

from ..env import REPO_ROOT  # one definition


def shipped_dir(env_var: str, *parts: str) -> Path:
    """``$env_var`` when set, else ``REPO_ROOT / parts`` (e.g. ``models/snapgen-micro``); ``env_var`` must be
    one of the variables of :mod:`snapgen.env`, which reads it."""
    from ..env import shipped_path

    return shipped_path(env_var, *parts)
