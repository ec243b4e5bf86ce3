"""Will this config fit? A dry run on the meta device: per-GPU memory of a training run, component by component.

``snapgen plan --config configs/paper/stage2_kd_1024.yaml --gpus 8 256 --gpu-memory 80GB``

Each :class:`Component` (the student, a frozen teacher, critics, LoRAs, projectors, text encoders, the VAE)
has its weights in their dtype, its gradients, AdamW state and EMA copy (trained parts only), all per GPU --
divided by the ranks where the component is sharded (FSDP2) -- and two kinds of activation memory:

* ``held``: kept until the backward pass (a trained forward's saved tensors, measured from the real model
  code by :func:`snapgen.train.plan_measure.saved_tensor_bytes`; a teacher's targets);
* ``working``: the peak of a forward that keeps nothing for backward (a frozen teacher, the critic's score,
  FSDP's gathered blocks), freed when it returns (:func:`snapgen.train.plan_measure.forward_peak_bytes`).

Peak per GPU = everything resident (weights, gradients, optimizer, EMA) + the activation peak, where the
components are listed in the order a training step runs them and each one's working set sits on top of what
the earlier ones hold: ``peak = max_i (sum_{j<i} held_j + working_i)`` and the sum of every ``held``
(:meth:`MemoryPlan.activation_peak`). Not counted: the CUDA context, NCCL buffers and allocator fragmentation
(a few GiB) -- hence the verdict's "tight" band above 90% of the GPU. What is counted for each task and where
the sizes of models that are not on this machine come from: :mod:`snapgen.train.plan_tasks`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch

from .plan_measure import activation_bytes_per_sample, saved_tensor_bytes

__all__ = ["Component", "MemoryPlan", "plan_memory", "student_component", "activation_bytes_per_sample",
           "parse_memory", "largest_block_params", "GiB", "DTYPE_BYTES"]

GiB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
TIGHT = 0.9  # above this share of the GPU the verdict is "tight": the uncounted runtime overhead may not fit


@dataclass
class Component:
    """One model (or group of models) of a run, bytes per GPU. ``params`` is the whole model's count."""

    name: str
    params: int = 0
    dtype: str = "fp32"
    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    ema: float = 0.0
    held: float = 0.0
    working: float = 0.0
    note: str = ""

    @property
    def resident(self) -> float:
        return self.weights + self.grads + self.optimizer + self.ema


def trained(name: str, params: int, shard: int = 1, ema: bool = True, **kw) -> Component:
    """A trained component: fp32 master weights, fp32 gradients, AdamW's two fp32 moments (the trainer's
    ``torch.optim.AdamW``), an fp32 EMA copy when averaged -- each divided over ``shard`` ranks (FSDP2)."""
    return Component(name, params, "fp32", 4 * params / shard, 4 * params / shard, 8 * params / shard,
                     4 * params / shard if ema else 0.0, **kw)


def frozen(name: str, params: int, dtype: str, shard: int = 1, **kw) -> Component:
    """A frozen component: weights only, in ``dtype``, divided over ``shard`` ranks."""
    return Component(name, params, dtype, DTYPE_BYTES[dtype] * params / shard, **kw)


@dataclass
class MemoryPlan:
    gpus: int
    strategy: str
    batch_per_gpu: int
    components: list[Component]
    gpu_memory: float = 80 * GiB
    notes: list[str] = field(default_factory=list)

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(f"no component {name!r}; components: {[c.name for c in self.components]}")

    @property
    def resident(self) -> float:
        return sum(c.resident for c in self.components)

    def activation_peak(self) -> float:
        """Components in step order: each working set on top of what the earlier components hold; then all held."""
        held = peak = 0.0
        for c in self.components:
            peak = max(peak, held + c.working)
            held += c.held
        return max(peak, held)

    @property
    def peak(self) -> float:
        return self.resident + self.activation_peak()

    @property
    def verdict(self) -> str:
        share = self.peak / self.gpu_memory
        return "fits" if share <= TIGHT else "tight" if share <= 1.0 else "does not fit"

    def to_dict(self) -> dict:
        return {"gpus": self.gpus, "strategy": self.strategy, "batch_per_gpu": self.batch_per_gpu,
                "components": [asdict(c) for c in self.components], "resident_gib": self.resident / GiB,
                "activation_peak_gib": self.activation_peak() / GiB, "peak_gib": self.peak / GiB,
                "gpu_memory_gib": self.gpu_memory / GiB, "verdict": self.verdict, "notes": self.notes}

    def table(self) -> str:
        def g(x: float) -> str:
            return f"{x / GiB:.2f}" if x else "-"

        head = ("component", "params", "dtype", "weights", "grads", "AdamW", "EMA", "held act", "working", "")
        rows = [(c.name, _count(c.params), c.dtype if c.params else "-", g(c.weights), g(c.grads), g(c.optimizer),
                 g(c.ema), g(c.held), g(c.working), c.note) for c in self.components]
        rows.append(("total (GiB per GPU)", "", "", g(sum(c.weights for c in self.components)),
                     g(sum(c.grads for c in self.components)), g(sum(c.optimizer for c in self.components)),
                     g(sum(c.ema for c in self.components)), "", f"peak act {g(self.activation_peak())}", ""))
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head) - 1)]
        fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths)) + "  {}"
        pct = 100 * self.peak / self.gpu_memory
        lines = [f"{self.strategy.upper()} on {self.gpus} GPU(s), {self.batch_per_gpu} per GPU (global "
                 f"{self.batch_per_gpu * self.gpus} before accumulation)", fmt.format(*head).rstrip()]
        lines += [fmt.format(*r).rstrip() for r in rows]
        lines.append(f"peak per GPU {self.peak / GiB:.2f} GiB = resident {self.resident / GiB:.2f} + activations "
                     f"{self.activation_peak() / GiB:.2f}; {pct:.0f}% of {self.gpu_memory / GiB:.0f} GiB: "
                     f"{self.verdict.upper()}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _count(n: int) -> str:
    if not n:
        return "-"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def parse_memory(text: str | float | int) -> float:
    """``"80GB"`` / ``"80GiB"`` / ``"80"`` -> bytes. GPU makers' "80 GB" is 80 GiB (an A100-80GB reports 81920
    MiB), so GB and GiB both mean 2**30 here; ``MB``/``MiB`` likewise 2**20."""
    if isinstance(text, (int, float)):
        return float(text) * GiB
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m|tib|tb|t)?\s*", str(text).lower())
    if not m:
        raise ValueError(f"GPU memory must look like 80GB, 80GiB or 40960MiB, got {text!r}")
    unit = {"t": 2**40, "g": GiB, "m": 2**20}[(m.group(2) or "g")[0]]
    return float(m.group(1)) * unit


def largest_block_params(model) -> int:
    blocks = [*model.down_blocks, *model.middle_blocks, *model.up_blocks]
    return max(sum(p.numel() for p in b.parameters()) for b in blocks)


def student_component(model, resolution: int | tuple[int, int], text_len: int, batch_per_gpu: int,
                      shard: int = 1, checkpointing: bool = True, activation_bytes: int = 2,
                      widths: list[str] | None = None, name: str = "student", ema: bool = True,
                      trained_params: int | None = None, cache: dict | None = None, key=None,
                      parameters: bool = True) -> Component:
    """The trained model: its parameters (``trained_params``: only those trained, e.g. LoRA; default all) and
    the activations one step keeps for backward -- every width in ``widths`` runs before the one backward, so
    their saved tensors add up. Measured in fp32 on the meta device, scaled to ``activation_bytes``;
    ``cache[key]`` keeps the per-sample measurement for the next plan of the same model (another GPU count);
    ``parameters``: count the weights autograd saves (autocast's bf16 copies: once per width, not per sample;
    see ``saved_tensor_bytes``)."""
    cfg = model.config
    H, W = (resolution, resolution) if isinstance(resolution, int) else resolution
    latent = (cfg.in_channels, H // cfg.vae_factor, W // cfg.vae_factor)
    full_key = (key, tuple(widths or ["full"]), latent, text_len, checkpointing)
    saved = cache.get(full_key) if cache is not None and key is not None else None
    if saved is None:
        saved = [0, 0]
        try:
            for w in widths or ["full"]:
                model.set_variant(w)
                a, p = saved_tensor_bytes(model, latent, text_len, checkpointing)
                saved = [saved[0] + a, saved[1] + p]
        finally:
            model.set_variant("full")
        if cache is not None and key is not None:
            cache[full_key] = saved
    P = sum(p.numel() for p in model.parameters())
    T = P if trained_params is None else trained_params
    held = (saved[0] * batch_per_gpu + (saved[1] if parameters else 0)) * activation_bytes / 4
    note = f"widths {'+'.join(widths or ['full'])}" + (", checkpointing" if checkpointing else "")
    return trained(name, T, shard, ema=ema, held=held, note=note)


def plan_memory(model_config, resolution: int, text_len: int, gpus: int, batch_per_gpu: int,
                strategy: str = "fsdp", checkpointing: bool = True, activation_bytes: int = 2,
                widths: list[str] | None = None, gpu_memory: float = 80 * GiB) -> MemoryPlan:
    """The student alone (a plain flow run): per-GPU memory of training ``model_config`` at ``resolution`` px
    on ``gpus`` GPUs; ``widths``: the elastic sub-networks trained per step; ``activation_bytes`` 2 = bf16
    (autocast with DDP, FSDP2's mixed precision with FSDP). Whole configs (teachers, critics, encoders, FSDP's
    reshard setting): :func:`snapgen.train.plan_tasks.plan_config`."""
    from ..models import build_model

    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be ddp or fsdp, got {strategy!r}")
    if gpus < 1 or batch_per_gpu < 1:
        raise ValueError("gpus and batch_per_gpu must be >= 1")
    with torch.device("meta"):
        model = build_model(model_config)
    fsdp = strategy == "fsdp" and gpus > 1
    comps = [student_component(model, resolution, text_len, batch_per_gpu, gpus if fsdp else 1, checkpointing,
                               activation_bytes, widths, parameters=activation_bytes == 2 and not fsdp)]
    if fsdp:  # current + prefetched block, in the compute dtype
        gathered = 2 * largest_block_params(model) * activation_bytes
        comps.append(Component("FSDP gathered parameters", working=gathered, note="two blocks, unsharded"))
    return MemoryPlan(gpus, strategy, batch_per_gpu, comps, gpu_memory)
