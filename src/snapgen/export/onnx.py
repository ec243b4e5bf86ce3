"""ONNX export of a text-to-image pipeline, and a runtime that generates with onnxruntime alone.

``export_onnx(pipe, out_dir, variant=..., resolution=...)`` writes three static-shape graphs
(``torch.onnx.export(..., dynamo=True)``, opset 18) and a manifest:

* ``text.onnx``: token ids + attention mask (padded to ``text_max_length``) -> the conditioning tokens the
  DiT reads (text encoder + the pipeline's trained projection);
* ``dit.onnx``: one denoiser call of the chosen variant, extracted as a standalone model with its few-step
  adapter merged (distilled pipelines) -- batch 1 without CFG, 2 with CFG (conditional + unconditional);
* ``decoder.onnx``: latents -> image in [-1, 1];
* ``tokenizer/``, ``null_text.npy`` / ``null_mask.npy`` (the unconditional tokens for CFG), ``export.json``.

:class:`OnnxPipeline` runs the same sampler code as the PyTorch pipeline (``snapgen.flow.sampling``) around
the three sessions, with the same seeded noise, so the two can be compared image for image.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["export_onnx", "OnnxPipeline", "EXPORT_FORMAT"]

EXPORT_FORMAT = "snapgen-onnx"


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"ONNX export needs the 'export' extra: pip install 'snapgen[export]' ({e.name} "
                          f"is missing)") from None


class _TextGraph(nn.Module):
    """Text encoder + the pipeline's conditioning projection, as one graph."""

    def __init__(self, hf_model, conditioning):
        super().__init__()
        self.hf_model, self.conditioning = hf_model, conditioning

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        # TextConditioning.forward for one encoder and a caption that is never dropped or empty (a tokenized
        # caption always holds [CLS]/[SEP]), without its null-embedding select: onnxruntime has no boolean
        # Where kernel. Equality with the pipeline's conditioning is tested.
        if len(self.conditioning.proj) != 1:
            raise ValueError("ONNX export supports one text encoder")
        h = self.hf_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        keep = attention_mask.to(h.dtype)[..., None]
        tokens = self.conditioning.proj[0](h * keep) * keep
        return tokens, attention_mask.bool()


class _DecoderGraph(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode_latents(latents)


def _export(module: nn.Module, args: tuple, path: Path, input_names, output_names) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=True, opset_version=18, input_names=list(input_names),
                          output_names=list(output_names), verbose=False, external_data=False)


def standalone_transformer(pipe, variant: str | None = None):
    """The pipeline's transformer at ``variant`` as a plain model: extracted, few-step adapter merged."""
    from ..distill.lora import merge_lora, set_adapter
    from ..elastic.supernet import extract_variant

    model = pipe.transformer
    variant = variant or model.variant
    if variant not in model.variants:
        raise ValueError(f"variant {variant!r} is not served by this model (it serves {sorted(model.variants)})")
    adapter = None if pipe._base_mode else pipe.config.adapters.get(variant)
    if pipe.distilled and adapter is None and not pipe._base_mode:
        raise ValueError(f"this distilled pipeline has few-step adapters for {sorted(pipe.config.adapters)}, "
                         f"not for {variant!r}")
    if adapter is not None:
        model = merge_lora(model, adapter)
    set_adapter(model, None)
    return extract_variant(model, variant).eval()


@torch.no_grad()
def export_onnx(pipe, out_dir: str | os.PathLike, variant: str | None = None,
                resolution: tuple[int, int] | None = None, progress: bool = True) -> Path:
    """Export ``pipe`` (a ``TextToImagePipeline``; its current mode: distilled few-step or base) to ``out_dir``."""
    _require_onnx()
    from ..models.dit import check_latent_size

    out = Path(out_dir)
    H, W = resolution or pipe.config.resolution
    f = pipe.vae_factor
    if H % f or W % f:
        raise ValueError(f"resolution {H}x{W} is not a multiple of the autoencoder factor {f}")
    cfg_t = pipe.transformer.config
    check_latent_size(H // f, W // f, cfg_t.downsample, cfg_t.vae_factor)
    encoder = pipe.text_encoder
    if not hasattr(encoder, "model") or not hasattr(encoder, "tokenizer"):
        raise ValueError(f"ONNX export supports transformers text encoders; {type(encoder).__name__} is not one")
    settings = pipe.sampling_settings()
    cfg_on = settings["guidance"] != 1.0
    batch = 2 if cfg_on else 1
    L = int(pipe.config.text_max_length)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    log = print if progress else (lambda *a, **k: None)

    text_graph = _TextGraph(encoder.model.eval(), pipe.conditioning.eval())
    ids = torch.ones(1, L, dtype=torch.long)
    attn = torch.ones(1, L, dtype=torch.long)
    log("exporting text.onnx ...")
    _export(text_graph, (ids, attn), tmp / "text.onnx", ["input_ids", "attention_mask"], ["text", "text_mask"])
    tokens, _ = text_graph(ids, attn)
    null, null_mask = pipe.conditioning.null(1, lengths=[L])
    np.save(tmp / "null_text.npy", null.numpy().astype(np.float32))
    np.save(tmp / "null_mask.npy", null_mask.numpy())

    dit = standalone_transformer(pipe)
    C = dit.config.in_channels
    x = torch.randn(batch, C, H // f, W // f)
    t = torch.full((batch,), 0.5)
    text = torch.randn(batch, tokens.shape[1], tokens.shape[2])
    mask = torch.ones(batch, tokens.shape[1], dtype=torch.bool)
    log(f"exporting dit.onnx ({dit.num_parameters() / 1e6:.2f}M parameters, batch {batch}) ...")
    _export(dit, (x, t, text, mask), tmp / "dit.onnx", ["x", "t", "text", "text_mask"], ["v"])

    log("exporting decoder.onnx ...")
    _export(_DecoderGraph(pipe.vae.eval()), (torch.randn(1, C, H // f, W // f),), tmp / "decoder.onnx",
            ["latents"], ["image"])
    encoder.tokenizer.save_pretrained(tmp / "tokenizer")
    from .. import __version__

    manifest = {"format": EXPORT_FORMAT, "snapgen_version": __version__, "variant": pipe.transformer.variant,
                "resolution": [H, W], "latent": [C, H // f, W // f], "batch": batch, "text_max_length": L,
                "sampler": settings["sampler"], "steps": settings["steps"], "guidance": settings["guidance"],
                "shift": settings["shift"], "few_step_times": list(pipe.config.few_step_times),
                "mode": "base" if pipe._base_mode else ("distilled" if pipe.distilled else "base"),
                "files": {n: os.path.getsize(tmp / n) for n in ("text.onnx", "dit.onnx", "decoder.onnx")}}
    (tmp / "export.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log(f"exported to {out} in {time.perf_counter() - t0:.0f} s")
    return out


class OnnxPipeline:
    """Generate from an ``export_onnx`` folder with onnxruntime (no snapgen model code involved)."""

    def __init__(self, directory: str | os.PathLike, threads: int = 0):
        _require_onnx()
        import onnxruntime as ort
        from transformers import AutoTokenizer

        d = Path(directory)
        meta_path = d / "export.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{d} is not a snapgen ONNX export (no export.json); create one with "
                                    f"`snapgen export onnx --out {d}`")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path} is corrupt ({e}); re-run snapgen export onnx") from None
        if self.meta.get("format") != EXPORT_FORMAT:
            raise ValueError(f"{d} holds format {self.meta.get('format')!r}, not {EXPORT_FORMAT!r}")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.sessions = {}
        for name in ("text", "dit", "decoder"):
            path = d / f"{name}.onnx"
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing; the export folder is incomplete (re-export)")
            try:
                self.sessions[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own exception types
                raise ValueError(f"cannot load {path}: {str(e).splitlines()[0]}. The file is corrupt or "
                                 f"truncated; re-run snapgen export onnx") from None
        self.tokenizer = AutoTokenizer.from_pretrained(d / "tokenizer", local_files_only=True)
        self.null_text = np.load(d / "null_text.npy")
        self.null_mask = np.load(d / "null_mask.npy")

    def encode(self, prompt: str):
        L = self.meta["text_max_length"]
        b = self.tokenizer([prompt], padding="max_length", truncation=True, max_length=L, return_tensors="np")
        tokens, mask = self.sessions["text"].run(None, {"input_ids": b["input_ids"].astype(np.int64),
                                                        "attention_mask": b["attention_mask"].astype(np.int64)})
        return tokens, mask

    def _dit(self, x: torch.Tensor, t: torch.Tensor, tokens, mask) -> torch.Tensor:
        """One sample's (guided) velocity; ``x (1, C, h, w)``."""
        dit = self.sessions["dit"]
        if self.meta["batch"] == 2:
            g = self.meta["guidance"]
            v = dit.run(None, {"x": torch.cat([x, x]).numpy(), "t": torch.cat([t, t]).numpy(),
                               "text": np.concatenate([tokens, self.null_text]).astype(np.float32),
                               "text_mask": np.concatenate([mask, self.null_mask])})[0]
            v_c, v_u = torch.from_numpy(v).chunk(2)
            return v_u + g * (v_c - v_u)
        return torch.from_numpy(dit.run(None, {"x": x.numpy(), "t": t.numpy(), "text": tokens, "text_mask": mask})[0])

    def __call__(self, prompts, seed: int | None = 0, return_latents: bool = False):
        """Same sampler, same seeded noise draws as ``TextToImagePipeline`` (the DiT graph has a static batch,
        so the batch is run one sample at a time inside each step)."""
        from ..data.base import tensor_to_image
        from ..flow.sampling import euler_sample, few_step_sample, sampling_times

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError("prompts must be non-empty strings")
        m = self.meta
        encoded = [self.encode(p) for p in prompts]
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        noise = torch.randn((len(prompts), *m["latent"]), generator=gen)

        def velocity(x, t):
            return torch.cat([self._dit(x[i:i + 1], t[i:i + 1], *encoded[i]) for i in range(len(x))])

        if m["sampler"] == "few_step":
            if m["few_step_times"] and m["steps"] == len(m["few_step_times"]) - 1:
                times = torch.tensor(m["few_step_times"])
            else:
                times = sampling_times(m["steps"], m["shift"])
            latents = few_step_sample(velocity, noise, times, generator=gen)
        else:
            latents = euler_sample(velocity, noise, sampling_times(m["steps"], m["shift"]))
        if return_latents:
            return latents
        images = [torch.from_numpy(self.sessions["decoder"].run(None, {"latents": lat[None].numpy()})[0][0])
                  for lat in latents]
        return [tensor_to_image(im) for im in images]
