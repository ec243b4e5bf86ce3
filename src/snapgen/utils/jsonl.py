"""JSON Lines files read one way everywhere: blank lines skipped, a malformed line named by ``path:line``."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["read_jsonl"]


def read_jsonl(path: str | os.PathLike, empty: str = "no prompts (the file is empty)") -> list[tuple[str, object]]:
    """``[(where, value)]`` for every non-blank line of ``path`` (``where`` = ``"path:line"``); invalid JSON raises
    ``ValueError`` naming the line, a file without any line raises ``ValueError(f"{path}: {empty}")``."""
    path = Path(path)
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                out.append((where, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not out:
        raise ValueError(f"{path}: {empty}")
    return out
