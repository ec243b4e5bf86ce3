"""Model cards: the ``README.md`` that ``save_pretrained`` writes into every model and pipeline folder.

The Hugging Face Hub's model card format (https://huggingface.co/docs/hub/model-cards): YAML front matter
(``library_name: snapgen``, ``license``, ``tags``, ``pipeline_tag: text-to-image`` for pipelines) then
Markdown: what the folder holds, its parameter counts, its config and how to load it. The metadata goes
through ``huggingface_hub.ModelCardData`` / ``ModelCard`` (no template engine needed), so a folder uploaded
as it is shows up on the Hub as a snapgen model. :func:`read_model_card` parses a card back.

Models call :func:`module_card_sections` from ``ModelIOMixin.save_pretrained``; the pipeline writes its own
card (``snapgen.pipelines.text_to_image``) and none in its ``transformer/`` and ``vae/`` subfolders.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

__all__ = ["CARD_NAME", "LIBRARY_NAME", "LICENSE", "format_count", "write_model_card", "read_model_card",
           "module_card_sections", "config_table"]

CARD_NAME = "README.md"
LIBRARY_NAME = "snapgen"
LICENSE = "apache-2.0"  # the repository's licence (pyproject.toml); the weights trained here share it


def format_count(n: int) -> str:
    """``8989123`` -> ``"8,989,123 (8.99M)"``."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n:,} ({n / scale:.2f}{unit})"
    return f"{n:,}"


def config_table(config: dict) -> str:
    """A two-column Markdown table of a config's fields (values as compact JSON)."""
    rows = ["| field | value |", "|---|---|"]
    for k, v in config.items():
        if not k.startswith("_"):
            rows.append(f"| `{k}` | `{json.dumps(v, separators=(', ', ': '))}` |")
    return "\n".join(rows)


def write_model_card(directory: str | os.PathLike, title: str, intro: str, sections: list[tuple[str, str]],
                     tags: list[str], pipeline_tag: str | None = None, license: str = LICENSE) -> Path:
    """Write ``directory/README.md`` atomically: front matter (library_name snapgen, license, tags, the
    pipeline tag if any), ``# title``, ``intro`` and each ``(heading, markdown)`` section."""
    from huggingface_hub import ModelCard, ModelCardData

    from .._version import __version__

    data = ModelCardData(library_name=LIBRARY_NAME, license=license, pipeline_tag=pipeline_tag,
                         tags=list(dict.fromkeys([LIBRARY_NAME, *tags])))
    body = [f"# {title}", "", intro.strip(), ""]
    for heading, text in sections:
        body += [f"## {heading}", "", text.strip(), ""]
    body.append(f"*Model card written by snapgen {__version__}.*")
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")
    path = Path(directory) / CARD_NAME
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{CARD_NAME}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(str(card))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_model_card(directory: str | os.PathLike) -> tuple[dict, str]:
    """``(front matter as a dict, Markdown text)`` of ``directory/README.md`` (``huggingface_hub.ModelCard``)."""
    from huggingface_hub import ModelCard

    path = Path(directory) / CARD_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no model card at {path} (save_pretrained writes one)")
    card = ModelCard.load(path)
    return card.data.to_dict(), card.text


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def module_card_sections(module: torch.nn.Module, dtype: torch.dtype | None) -> tuple[str, list, list[str]]:
    """``(intro, sections, tags)`` of a ``ModelIOMixin`` model's card: class, family, parameter count
    (LoRA adapters are saved apart and not counted), weight dtype, config table, how to load."""
    cls = type(module)
    family = getattr(cls, "family", None)  # set by snapgen.models.register_model
    n = sum(p.numel() for name, p in module.named_parameters() if ".lora." not in name)
    first = next((p for p in module.parameters() if p.is_floating_point()), None)
    saved = dtype if dtype is not None else (first.dtype if first is not None else torch.float32)
    intro = (f"A `{cls.__name__}`" + (f" (snapgen model family `{family}`)" if family else "")
             + f" saved by snapgen: **{format_count(n)} parameters**, weights in `model.safetensors` "
             f"({_dtype_name(saved)}), the config in `config.json`.")
    variants = getattr(module, "variants", None)
    if isinstance(variants, dict) and len(variants) > 1:
        intro += (" It is an elastic supernetwork serving the sub-networks "
                  + ", ".join(f"`{k}` ({v:g}x width)" for k, v in variants.items()) + " from one set of weights.")
    if family:
        load = ("```python\nfrom snapgen.models import load_model\n\n"
                "model = load_model(\"path/to/this-folder\")  # or a Hugging Face Hub id holding it\n```")
    else:
        load = (f"```python\nfrom {cls.__module__} import {cls.__name__}\n\n"
                f"model = {cls.__name__}.from_pretrained(\"path/to/this-folder\")  # or a Hub id holding it\n```")
    config = module.config.to_dict() if hasattr(module.config, "to_dict") else {}
    sections = [("How to load", load + "\n\n`pip install snapgen` is enough (no extras)."),
                ("Config", config_table(config))]
    return intro, sections, [t for t in (family, cls.__name__) if t]
