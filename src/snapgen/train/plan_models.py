"""Sizes of the models a run holds besides the student, for the memory planner -- without their weights.

A model is described by a dict, either in the training config's ``plan:`` section (the sizes of models whose
folders are not on this machine) or derived from the run's own settings (``kd.teacher``, ``distill.teacher``,
``model.init_from``, ``text.encoder``, ``vae.path`` when those folders exist here).
Keys (one of the first four says what the model is):

* ``diffusers: QwenImageTransformer2DModel`` (+ ``config: {...}`` overrides of the class defaults): built
  on the meta device from diffusers' own class, so the parameter count is the library's; the forward working
  set is measured on a one-block copy (a no-grad forward of identical blocks holds one block's tensors at a
  time, so one block gives the same peak). Supported classes: :data:`DIFFUSERS_INPUTS`.
* ``snapgen: {preset: full, ...}``: a snapgen model (a ``model:`` section), built on the meta device;
* ``path: <folder>``: a saved snapgen pipeline or transformer folder (its ``config.json``), a diffusers
  transformer folder of a supported class (built from its ``config.json`` as above), or any folder of
  ``*.safetensors`` (parameters counted from the file headers; nothing is loaded);
* ``params: 8.29e9``: a published parameter count (no working set is measured then);
* ``name`` (for the table), ``dtype`` (``fp32`` / ``bf16`` / ``fp16``; default fp32 -- what snapgen's loaders
  give), ``shard`` (true: divided over the ranks like FSDP2, one block gathered at a time), and for a teacher
  ``text_encoder:`` (its own frozen text encoder, a model dict of the same form).
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .plan import DTYPE_BYTES

__all__ = ["ModelSize", "model_size", "DIFFUSERS_INPUTS", "safetensors_params"]

_KEYS = {"name", "dtype", "shard", "diffusers", "config", "snapgen", "path", "params", "text_encoder"}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelSize:
    """A frozen model's size; ``working(latent, text_len)`` gives one sample's no-grad forward peak and the
    bytes it returns (velocity + the features a distillation loss reads), or ``(0, 0)`` when unknown."""

    name: str
    params: int
    dtype: str
    shard: bool
    source: str
    kind: str = "params"              # "snapgen" | "diffusers" | "params"
    feature_width: int | None = None  # width of the "last" features (KD / K-DMD projector output)
    largest_block: int = 0            # parameters of the largest block (FSDP gathers two at a time)
    spec: str = ""                    # JSON of the description (the cache key of the measurements)
    text_encoder: "ModelSize | None" = None

    def working(self, latent: tuple[int, int, int], text_len: int) -> tuple[int, int]:
        if self.kind == "params":
            return 0, 0
        return _working(self.kind, self.spec, self.dtype, tuple(latent), int(text_len))


def model_size(desc: dict, where: str, default_name: str = "model") -> ModelSize:
    """Parse a model description (``where`` names its place in the config, for error messages)."""
    if not isinstance(desc, dict):
        raise ValueError(f"{where} must be a mapping (e.g. {{params: 8.29e9, dtype: bf16}}), got {desc!r}")
    unknown = sorted(set(desc) - _KEYS)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in {where}; valid: {sorted(_KEYS)}")
    kinds = [k for k in ("diffusers", "snapgen", "path", "params") if k in desc]
    if len(kinds) != 1:
        raise ValueError(f"{where} needs exactly one of diffusers / snapgen / path / params to size the model "
                         f"(got {kinds or 'none'})")
    dtype = str(desc.get("dtype", "fp32"))
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"{where}.dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    spec = json.dumps({k: desc[k] for k in ("diffusers", "config", "snapgen", "path") if k in desc}, sort_keys=True)
    common = dict(dtype=dtype, shard=bool(desc.get("shard", False)), spec=spec)
    name = str(desc.get("name", default_name))
    text = model_size(desc["text_encoder"], f"{where}.text_encoder", "text encoder") if "text_encoder" in desc else None
    kind = kinds[0]
    if kind == "params":
        return ModelSize(name, int(float(desc["params"])), source=f"{where}.params", text_encoder=text, **common)
    if kind == "path":
        folder = Path(desc["path"])
        if _is_snapgen(folder):
            spec = json.dumps({"path": str(folder)})
            size = _from_snapgen(_snapgen_model(spec), name, f"{where}.path {folder}", {**common, "spec": spec}, text)
            cond = folder / "text_conditioning.safetensors"  # a pipeline's trained text conditioning (frozen too)
            size.params += safetensors_params(cond) if cond.is_file() else 0
            return size
        diffusers_cls = _diffusers_class(folder)
        if diffusers_cls is not None:
            config = {k: v for k, v in json.loads((folder / "config.json").read_text()).items()
                      if not k.startswith("_")}
            return model_size({**{k: desc[k] for k in ("name", "dtype", "shard", "text_encoder") if k in desc},
                               "diffusers": diffusers_cls, "config": config}, where, default_name)
        if not folder.is_dir():
            raise FileNotFoundError(f"{where}.path {folder} does not exist; give the model's size instead "
                                    f"({where}: {{params: ..., dtype: ...}})")
        return ModelSize(name, safetensors_params(folder), source=f"{where}.path {folder} (safetensors headers)",
                         text_encoder=text, **common)
    if kind == "snapgen":
        return _from_snapgen(_snapgen_model(spec), name, f"{where}.snapgen", common, text)
    cls = desc["diffusers"]
    if cls not in DIFFUSERS_INPUTS:
        raise ValueError(f"{where}.diffusers: no input builder for {cls!r} (the planner measures the forward "
                         f"working set with real inputs); supported: {sorted(DIFFUSERS_INPUTS)}. Give "
                         f"params: instead to count its weights only")
    model = _diffusers_model(spec, 0)
    return ModelSize(name, sum(p.numel() for p in model.parameters()), source=f"{where}.diffusers {cls}",
                     kind="diffusers", feature_width=DIFFUSERS_INPUTS[cls].feature_width(model.config),
                     largest_block=max(sum(p.numel() for p in b.parameters()) for b in model.transformer_blocks),
                     text_encoder=text, **common)


def _diffusers_class(folder: Path) -> str | None:
    """The ``_class_name`` of a diffusers model folder when the planner can measure that class."""
    try:
        name = json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return name if name in DIFFUSERS_INPUTS else None


def _is_snapgen(folder: Path) -> bool:
    """A snapgen pipeline folder, or a model folder whose ``config.json`` names a registered snapgen class
    (foreign folders -- transformers, diffusers -- name none or another class, and are counted from headers)."""
    from ..models import registry

    if (folder / "pipeline.json").is_file():
        return True
    try:
        name = json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
    return name in registry._CLASS_NAMES


def _from_snapgen(model, name, source, common, text) -> ModelSize:
    from .plan import largest_block_params

    return ModelSize(name, sum(p.numel() for p in model.parameters()), source=source, kind="snapgen",
                     feature_width=model.config.width, largest_block=largest_block_params(model),
                     text_encoder=text, **common)


@functools.lru_cache(maxsize=8)
def _snapgen_model(spec: str):
    """A snapgen model on the meta device from a ``{"snapgen": model-section}`` or ``{"path": folder}`` spec."""
    from ..models import build_model
    from ..models.registry import saved_class

    d = json.loads(spec)
    with torch.device("meta"):
        if "snapgen" in d:
            return build_model(dict(d["snapgen"])).eval()
        folder = Path(d["path"])
        folder = folder / "transformer" if (folder / "pipeline.json").is_file() else folder
        cls, config = saved_class(folder)
        return cls(config).eval()


@functools.lru_cache(maxsize=8)
def _diffusers_model(spec: str, num_layers: int):
    """A diffusers model on the meta device (``num_layers``: override the block count; 0 = the config's)."""
    import diffusers

    d = json.loads(spec)
    config = dict(d.get("config") or {})
    if num_layers:
        config["num_layers"] = num_layers
    with torch.device("meta"):
        return getattr(diffusers, d["diffusers"])(**config).eval()


def safetensors_params(folder: Path) -> int:
    """Parameters of a ``.safetensors`` file or of every one under a folder, from the file headers (no tensor
    is read)."""
    from safetensors import safe_open

    folder = Path(folder)
    files = [folder] if folder.is_file() else sorted(folder.rglob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.safetensors file to count parameters from")
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                n = 1
                for s in h.get_slice(k).get_shape():
                    n *= int(s)
                total += n
    return total


# ---------------------------------------------------------------------------------------------- working sets
class _QwenImageInputs:
    """``QwenImageTransformer2DModel``: 2x2-packed latent tokens (64 channels), Qwen2.5-VL text features."""

    @staticmethod
    def feature_width(config) -> int:
        return int(config.num_attention_heads * config.attention_head_dim)

    @staticmethod
    def call(model, latent, text_len, dtype):
        C, h, w = latent
        p = model.config.patch_size
        kw = dict(device="meta", dtype=dtype)
        x = torch.empty(1, (h // p) * (w // p), C * p * p, **kw)
        text = torch.empty(1, text_len, model.config.joint_attention_dim, **kw)
        mask = torch.ones(1, text_len, device="meta", dtype=torch.bool)
        feats = []
        hook = model.transformer_blocks[-1].register_forward_hook(lambda m, a, out: feats.append(out[1]))
        try:
            out = model(hidden_states=x, encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                        timestep=torch.empty(1, **kw), img_shapes=[[(1, h // p, w // p)]], return_dict=False)[0]
        finally:
            hook.remove()
        return out, feats[-1]  # velocity (packed) + the last block's image tokens


DIFFUSERS_INPUTS = {"QwenImageTransformer2DModel": _QwenImageInputs}


@functools.lru_cache(maxsize=32)
def _working(kind: str, spec: str, dtype: str, latent: tuple, text_len: int) -> tuple[int, int]:
    from .plan_measure import forward_peak_bytes

    dt = _DTYPES[dtype]
    if kind == "snapgen":
        from ..models.multiscale import denoiser_input_shapes

        model = copy.deepcopy(_snapgen_model(spec)).to(dt)  # meta tensors: the copy costs nothing
        x_shape, t_shape = denoiser_input_shapes(model.config, 1, tuple(latent))  # DFM: the packed state
        x = torch.empty(x_shape, device="meta", dtype=dt)
        t = torch.empty(t_shape, device="meta", dtype=dt)
        text = torch.empty(1, text_len, model.config.text_dim, device="meta", dtype=dt)

        def call():
            v, f = model(x, t, {"text": text}, features=("last",))
            return v, f["last"]
        return forward_peak_bytes(call)
    # one block: the same peak as all of them (module doc); nn.Module.to skips diffusers' dtype warning
    model = torch.nn.Module.to(copy.deepcopy(_diffusers_model(spec, 1)), dt)
    inputs = DIFFUSERS_INPUTS[json.loads(spec)["diffusers"]]
    return forward_peak_bytes(lambda: inputs.call(model, latent, text_len, dt))
