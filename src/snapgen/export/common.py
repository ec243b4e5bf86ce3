"""What every export backend shares: the three graphs of a pipeline (text, one DiT step, decoder) with their
example inputs, the manifest, and :class:`ExportedPipeline` -- the sampler loop around three compiled graphs,
identical to ``TextToImagePipeline``'s: the same ``snapgen.sampling`` sampler built from the same
``SamplerConfig`` (written to ``export.json`` in ``pipeline.json``'s fields), the same CFG
(``snapgen.sampling.cfg_velocity``), the same seeded noise draws.

Backends (``snapgen.export.onnx``, ``snapgen.export.mobile``) only turn a module into a file and run a file.
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

from ..sampling import SamplerConfig, guided, make_sampler

__all__ = ["standalone_transformer", "device_rewrite", "pipeline_graphs", "write_export", "ExportedPipeline"]


class TextGraph(nn.Module):
    """Text encoder + the pipeline's conditioning projection, as one graph.

    ``TextConditioning.forward`` for one encoder and a caption that is never dropped or empty (a tokenized
    caption always holds [CLS]/[SEP]), without its null-embedding select (onnxruntime has no boolean
    ``Where`` kernel). Equality with the PyTorch pipeline is covered by the parity tests."""

    def __init__(self, hf_model, conditioning):
        super().__init__()
        if len(conditioning.proj) != 1:
            raise ValueError("export supports one text encoder")
        self.hf_model, self.conditioning = hf_model, conditioning

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        h = self.hf_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        keep = attention_mask.to(h.dtype)[..., None]
        tokens = self.conditioning.proj[0](h * keep) * keep
        return tokens, attention_mask.bool()


class MultiTextGraph(nn.Module):
    """Several text encoders + their projections, as one graph: inputs ``input_ids_0, attention_mask_0,
    input_ids_1, ...`` (each encoder's own tokenization), outputs the concatenated ``(text, text_mask)`` --
    ``TextConditioning.forward`` for captions never dropped, like :class:`TextGraph`."""

    def __init__(self, hf_models, conditioning):
        super().__init__()
        if len(conditioning.proj) != len(hf_models):
            raise ValueError(f"{len(hf_models)} text encoders for a conditioning of {len(conditioning.proj)}")
        self.hf_models, self.conditioning = nn.ModuleList(hf_models), conditioning

    def forward(self, *inputs: torch.Tensor):
        tokens, masks = [], []
        for i, model in enumerate(self.hf_models):
            ids, attention_mask = inputs[2 * i], inputs[2 * i + 1]
            h = model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
            keep = attention_mask.to(h.dtype)[..., None]
            tokens.append(self.conditioning.proj[i](h * keep) * keep)
            masks.append(attention_mask.bool())
        return torch.cat(tokens, 1), torch.cat(masks, 1)


class DenoiserGraph(nn.Module):
    """One denoiser step with flat tensor inputs ``(x, t, text, text_mask)`` (graphs take tensors, not the
    Denoiser's ``cond`` dict). The model's parameters keep their names under ``model.``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return self.model(x, t, {"text": text, "text_mask": text_mask})


class DecoderGraph(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode_latents(latents)


def standalone_transformer(pipe, variant: str | None = None):
    """The pipeline's transformer at ``variant`` as a plain model: extracted, few-step adapter merged
    (``TextToImagePipeline.extract``)."""
    return pipe.extract(variant or pipe.transformer.variant).transformer.eval()


def device_rewrite(model: nn.Module) -> nn.Module:
    """The paper's on-device form, numerically equal to the training model (tested): blockwise attention as
    index gathers + one batched dense attention (BNA backend ``tiles``; no strided views or data-dependent
    control flow), static shapes (fixed at export). The model code already keeps every tensor at rank <= 5."""
    from ..attention import AdaptiveSparseSelfAttention

    for m in model.modules():
        if isinstance(m, AdaptiveSparseSelfAttention):
            m.bna_backend = "tiles"
    return model


def _cast_graph(module: nn.Module, args: tuple, dtype: torch.dtype):
    """A copy of ``module`` and its example inputs in ``dtype`` (float tensors only); the pipeline keeps its own."""
    if dtype == torch.float32:
        return module, args
    import copy

    return (copy.deepcopy(module).to(dtype),
            tuple(a.to(dtype) if a.is_floating_point() else a for a in args))


def pipeline_graphs(pipe, resolution: tuple[int, int] | None = None, rewrite: bool = False,
                    dtype: torch.dtype = torch.float32) -> dict:
    """The three graphs of ``pipe`` (its current variant and mode) with example inputs and I/O names, in ``dtype``
    (fp32, or fp16 copies of the modules for an fp16 export; ``meta["dtype"]`` records it)."""
    from ..models.three_stage_dit import check_latent_size

    H, W = resolution or pipe.config.resolution
    f = pipe.vae_factor
    if H % f or W % f:
        raise ValueError(f"resolution {H}x{W} is not a multiple of the autoencoder factor {f}")
    cfg_t = pipe.transformer.config
    check_latent_size(H // f, W // f, cfg_t.downsample, cfg_t.vae_factor)
    encoders = pipe.text_encoders
    for encoder in encoders:
        if not hasattr(encoder, "model") or not hasattr(encoder, "tokenizer"):
            raise ValueError(f"export supports transformers text encoders; {type(encoder).__name__} is not one")
    sampler = make_sampler(pipe.sampler_config())
    batch = 2 if sampler.config.guidance != 1.0 else 1
    if len(encoders) == 1:
        lengths = [int(pipe.config.text_max_length)]
        text_graph = TextGraph(encoders[0].model.eval(), pipe.conditioning.eval())
        text_names = ["input_ids", "attention_mask"]
    else:  # one graph for every encoder: each tokenized at its own (capped) max length, as the pipeline does
        lengths = [int(e.max_length) for e in encoders]
        text_graph = MultiTextGraph([e.model.eval() for e in encoders], pipe.conditioning.eval())
        text_names = [f"{k}_{i}" for i in range(len(encoders)) for k in ("input_ids", "attention_mask")]
    text_args = tuple(torch.ones(1, L, dtype=torch.long) for L in lengths for _ in range(2))
    L = lengths[0] if len(encoders) == 1 else lengths
    with torch.no_grad():
        tokens, _ = text_graph(*text_args)
    dit = standalone_transformer(pipe)
    if rewrite:
        dit = device_rewrite(dit)
    C = dit.config.in_channels
    latent = (C, H // f, W // f)
    null, null_mask = pipe.conditioning.null(1, lengths=lengths)
    meta = {"variant": pipe.transformer.variant, "resolution": [H, W], "latent": list(latent), "batch": batch,
            "text_max_length": L, **sampler_meta(sampler), "rewrite": rewrite,
            "mode": "distilled" if pipe.distilled and not pipe._base_mode else "base",
            "dit_parameters": dit.num_parameters(), "dtype": str(dtype).removeprefix("torch.")}
    if len(encoders) > 1:
        meta["text_encoders"] = len(encoders)
    from ..models.multiscale import denoiser_input_shapes

    x_shape, t_shape = denoiser_input_shapes(dit.config, batch, latent)  # DFM: the packed state, one t per level
    dit_x, dit_t = torch.randn(x_shape), torch.full(t_shape, 0.5)
    if getattr(dit.config, "dfm_levels", 1) > 1:
        meta["dfm_levels"] = dit.config.dfm_levels
    graphs = {
        "text": (text_graph, text_args, text_names, ["text", "text_mask"]),
        "dit": (DenoiserGraph(dit), (dit_x, dit_t,
                                     torch.randn(batch, tokens.shape[1], tokens.shape[2]),
                                     torch.ones(batch, tokens.shape[1], dtype=torch.bool)),
                ["x", "t", "text", "text_mask"], ["v"]),
        "decoder": (DecoderGraph(pipe.vae.eval()), (torch.randn(1, *latent),), ["latents"], ["image"]),
    }
    graphs = {name: (*_cast_graph(module, args, dtype), ins, outs)
              for name, (module, args, ins, outs) in graphs.items()}
    return {"graphs": graphs, "tokenizers": [e.tokenizer for e in encoders], "null": (null.detach(), null_mask),
            "meta": meta}


def sampler_meta(sampler) -> dict:
    """``export.json``'s sampler entries: the ``SamplerConfig`` in ``pipeline.json``'s fields (read back by
    :meth:`ExportedPipeline.sampler_config`), plus the resolved time grid for runtimes outside Python."""
    fields = sampler.config.to_fields()
    meta = {**fields, "few_step_times": list(fields["few_step_times"]),
            "sampling_times": [float(t) for t in sampler.times()]}
    if sampler.config.kind == "dfm":  # every stage's time at every step (NOT_STARTED = 2: not started yet)
        meta.update(stage_steps=list(fields["stage_steps"]), stage_thresholds=list(fields["stage_thresholds"]),
                    stage_schedule=[[float(t) for t in row] for row in sampler.schedule()])
    return meta


@torch.no_grad()
def write_export(pipe, out_dir, fmt: str, suffix: str, writer, resolution=None, rewrite: bool = False,
                 progress: bool = True, dtype: torch.dtype = torch.float32) -> Path:
    """Export ``pipe`` with ``writer(module, args, path, input_names, output_names)`` for each graph, atomically.
    A writer may return a dict of extra manifest entries (e.g. Core ML's count of palettized weights; dict
    entries of several graphs are merged). ``files`` in ``export.json`` lists every file a graph wrote
    (``dit.onnx`` and its external ``dit.onnx.data``), and loading checks that they are all there."""
    from .._version import __version__

    out = Path(out_dir)
    parts = pipeline_graphs(pipe, resolution, rewrite, dtype)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    log = print if progress else (lambda *a, **k: None)
    t0 = time.perf_counter()
    files, extra = {}, {}
    for name, (module, args, ins, outs) in parts["graphs"].items():
        log(f"exporting {name}{suffix} ...")
        for key, value in (writer(module, args, tmp / f"{name}{suffix}", ins, outs) or {}).items():
            extra[key] = {**extra[key], **value} if isinstance(value, dict) and key in extra else value
        for p in sorted(tmp.glob(f"{name}{suffix}*")):  # the graph and any side files (external data)
            files[p.name] = (sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir()
                             else p.stat().st_size)
    tokenizers = parts["tokenizers"]  # tokenizer/ (one encoder), or tokenizer_0/, tokenizer_1/, ...
    for i, tokenizer in enumerate(tokenizers):
        tokenizer.save_pretrained(tmp / ("tokenizer" if len(tokenizers) == 1 else f"tokenizer_{i}"))
    null, null_mask = parts["null"]
    np.save(tmp / "null_text.npy", null.numpy().astype(np.float32))
    np.save(tmp / "null_mask.npy", null_mask.numpy())
    manifest = {"format": fmt, "snapgen_version": __version__, **parts["meta"], "files": files, **extra}
    (tmp / "export.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log(f"exported to {out} in {time.perf_counter() - t0:.0f} s")
    return out


class ExportedPipeline:
    """Generation around three compiled graphs; subclasses load them and implement :meth:`_run`."""

    format: str = ""
    suffix: str = ""
    command: str = ""

    def __init__(self, directory: str | os.PathLike):
        from transformers import AutoTokenizer

        d = Path(directory)
        meta_path = d / "export.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{d} is not a snapgen {self.command} export (no export.json); create one "
                                    f"with `snapgen export {self.command} --out {d}`")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path} is corrupt ({e}); re-run snapgen export {self.command}") from None
        if self.meta.get("format") != self.format:
            raise ValueError(f"{d} holds format {self.meta.get('format')!r}, not {self.format!r}")
        self.directory = d
        missing = [f for f in self.meta.get("files", {}) if not (d / f).exists()]
        if missing:
            raise FileNotFoundError(f"{d} lacks {', '.join(missing)} (listed in export.json); the export folder is "
                                    f"incomplete: copy the whole folder (external weights *.data included) or "
                                    f"re-run snapgen export {self.command}")
        self.graphs = {}
        for name in ("text", "dit", "decoder"):
            path = d / f"{name}{self.suffix}"
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing; the export folder is incomplete (re-export)")
            try:
                self.graphs[name] = self._load(path)
            except Exception as e:  # runtimes raise their own exception types
                raise ValueError(f"cannot load {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}. "
                                 f"The file is corrupt or truncated; re-run snapgen export {self.command}") from None
        n = int(self.meta.get("text_encoders", 1))
        self.tokenizers = [AutoTokenizer.from_pretrained(d / ("tokenizer" if n == 1 else f"tokenizer_{i}"),
                                                         local_files_only=True) for i in range(n)]
        self.tokenizer = self.tokenizers[0]
        self.null_text = torch.from_numpy(np.load(d / "null_text.npy"))
        self.null_mask = torch.from_numpy(np.load(d / "null_mask.npy"))

    def _load(self, path: Path):  # pragma: no cover - backend specific
        raise NotImplementedError

    def _run(self, name: str, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def encode(self, prompt: str):
        """Every text encoder's tokens of ``prompt`` through the text graph (several: inputs ``input_ids_i``,
        ``attention_mask_i``, each padded to its own max length)."""
        lengths = self.meta["text_max_length"]
        lengths = lengths if isinstance(lengths, list) else [lengths]
        inputs = {}
        for i, (tokenizer, L) in enumerate(zip(self.tokenizers, lengths)):
            b = tokenizer([prompt], padding="max_length", truncation=True, max_length=L, return_tensors="pt")
            suffix = "" if len(self.tokenizers) == 1 else f"_{i}"
            inputs[f"input_ids{suffix}"] = b["input_ids"].long()
            inputs[f"attention_mask{suffix}"] = b["attention_mask"].long()
        tokens, mask = self._run("text", inputs)
        return tokens, mask.bool()

    def sampler_config(self) -> SamplerConfig:
        """The sampler fixed at export time (``export.json``'s sampler fields, as in ``pipeline.json``)."""
        m = self.meta
        config = SamplerConfig.from_fields(m["sampler"], m["steps"], m["guidance"], m["shift"],
                                           m.get("few_step_times", ()), m.get("stage_steps", ()),
                                           m.get("stage_thresholds", ()))
        if (m["batch"] == 2) != (config.guidance != 1.0):
            raise ValueError(f"{self.directory / 'export.json'} is inconsistent: a DiT graph of batch {m['batch']} "
                             f"with guidance {config.guidance}; re-run snapgen export {self.command}")
        return config

    def _dit(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """One call of the DiT graph, as a Denoiser (``cond = {"text", "text_mask"}``); its batch is static
        (1, or 2 with CFG: ``cfg_velocity`` stacks the conditional and unconditional sample)."""
        return self._run("dit", {"x": x, "t": t, "text": cond["text"].float(), "text_mask": cond["text_mask"]})[0]

    def __call__(self, prompts, seed: int | list[int] | None = 0, return_latents: bool = False):
        """Same sampler, same CFG, same seeded noise draws as ``TextToImagePipeline`` (the DiT graph has a static
        batch, so the batch is run one sample at a time inside each step). ``seed``: an int (one generator for
        the batch) or a list of one int per prompt (one generator per image: image ``i`` is the image of a
        one-prompt call with ``seed[i]``), as ``TextToImagePipeline.__call__``."""
        from ..data.base import tensor_to_image
        from ..utils.random import randn, seed_generators

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError("prompts must be non-empty strings")
        gen = seed_generators(seed, len(prompts))  # a list of seeds of the wrong length: ValueError
        sampler = make_sampler(self.sampler_config())
        uncond = {"text": self.null_text, "text_mask": self.null_mask}
        per_sample = [guided(self._dit, {"text": tokens, "text_mask": mask}, uncond, sampler.config.guidance)
                      for tokens, mask in (self.encode(p) for p in prompts)]
        def velocity(x, t):
            return torch.cat([v(x[i:i + 1], t[i:i + 1]) for i, v in enumerate(per_sample)])

        levels = int(self.meta.get("dfm_levels", 1))
        if levels > 1:  # DFM: the packed pyramid noise, the stage-scheduled sampler, the recomposed latent
            from ..pipelines.progressive import dfm_latents

            latents = dfm_latents(levels, sampler, velocity, (len(prompts), *self.meta["latent"]), gen, None, None)
        else:
            noise = randn((len(prompts), *self.meta["latent"]), gen)  # a seed list: row i from gen[i]
            latents = sampler.sample(velocity, noise, generator=gen)
        if return_latents:
            return latents
        images = [self._run("decoder", {"latents": lat[None]})[0][0] for lat in latents]
        return [tensor_to_image(im) for im in images]
