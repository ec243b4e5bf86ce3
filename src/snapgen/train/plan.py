"""Will this config fit? A dry run on the meta device: builds the model of a training config without
allocating memory, measures the activations one sample keeps for backward (by recording every tensor
autograd saves during a forward of the real model code), and adds parameters, gradients and AdamW state
per GPU for DDP (everything replicated) or FSDP2 (parameters, gradients and optimizer state sharded over
the ranks, one block's parameters gathered at a time).

``snapgen plan --config configs/paper/stage1_pretrain_256.yaml --gpus 256``
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MemoryPlan", "plan_memory", "activation_bytes_per_sample"]

GiB = 2**30


def activation_bytes_per_sample(model, latent_shape: tuple[int, int, int], text_len: int,
                                checkpointing: bool = False) -> int:
    """Bytes (fp32) that one training sample keeps for backward, measured by recording every tensor autograd
    saves during a forward of the real model on the meta device (nothing is allocated). With gradient
    checkpointing a block keeps only its input, and one block's saved tensors exist at a time (recompute)."""
    blocks = [*model.down_blocks, *model.middle_blocks, *model.up_blocks]
    per_block = {id(b): 0 for b in blocks}
    block_inputs = {id(b): 0 for b in blocks}
    current: list = [None]
    outside = [0]

    def pack(t):
        n = t.numel() * t.element_size()
        if current[0] is None:
            outside[0] += n
        else:
            per_block[current[0]] += n
        return t

    def pre(module, args):
        current[0] = id(module)
        block_inputs[id(module)] = args[0].numel() * args[0].element_size()

    def post(module, args, out):
        current[0] = None

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(pre), b.register_forward_hook(post))]
    cfg = model.config
    x = torch.randn(1, *latent_shape, device="meta")
    t = torch.rand(1, device="meta")
    text = torch.randn(1, text_len, cfg.text_dim, device="meta")
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, t, {"text": text})
    finally:
        for h in handles:
            h.remove()
    if not checkpointing:
        return outside[0] + sum(per_block.values())
    return outside[0] + sum(block_inputs.values()) + max(per_block.values(), default=0)


@dataclass
class MemoryPlan:
    gpus: int
    strategy: str
    batch_per_gpu: int
    params: int
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    gathered_gib: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.grads_gib + self.optimizer_gib + self.activations_gib + self.gathered_gib

    def table(self) -> str:
        rows = [("parameters", f"{self.params / 1e6:,.1f}M"), ("weights (fp32)", f"{self.weights_gib:.2f} GiB"),
                ("gradients (fp32)", f"{self.grads_gib:.2f} GiB"),
                ("AdamW state (2 x fp32)", f"{self.optimizer_gib:.2f} GiB"),
                (f"activations (batch {self.batch_per_gpu}/GPU, bf16)", f"{self.activations_gib:.2f} GiB"),
                ("gathered block params (FSDP)", f"{self.gathered_gib:.2f} GiB"),
                ("total per GPU", f"{self.total_gib:.2f} GiB")]
        w = max(len(r[0]) for r in rows)
        head = f"{self.strategy.upper()} on {self.gpus} GPU(s), global batch {self.batch_per_gpu * self.gpus}"
        return "\n".join([head] + [f"  {a:<{w}}  {b:>12}" for a, b in rows])


def plan_memory(model_config, resolution: int, text_len: int, gpus: int, batch_per_gpu: int,
                strategy: str = "fsdp", checkpointing: bool = True, activation_bytes: int = 2,
                widths: list[str] | None = None) -> MemoryPlan:
    """Per-GPU memory of training ``model_config`` at ``resolution`` px (square) on ``gpus`` GPUs. ``widths``:
    the elastic sub-networks trained per step (their activations are all kept until the one backward)."""
    from ..models import build_model

    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be ddp or fsdp, got {strategy!r}")
    if gpus < 1 or batch_per_gpu < 1:
        raise ValueError("gpus and batch_per_gpu must be >= 1")
    with torch.device("meta"):
        model = build_model(model_config)
    P = sum(p.numel() for p in model.parameters())
    f = model_config.vae_factor
    latent = (model_config.in_channels, resolution // f, resolution // f)
    saved = 0
    for w in widths or ["full"]:
        model.set_variant(w)
        saved += activation_bytes_per_sample(model, latent, text_len, checkpointing)
    model.set_variant("full")
    act = saved * batch_per_gpu * activation_bytes / 4  # measured in fp32; trained in bf16
    shard = gpus if strategy == "fsdp" else 1
    largest_block = max(sum(p.numel() for p in b.parameters())
                        for b in [*model.down_blocks, *model.middle_blocks, *model.up_blocks])
    gathered = 2 * largest_block * 4 if strategy == "fsdp" and gpus > 1 else 0  # current + prefetched block
    return MemoryPlan(gpus, strategy, batch_per_gpu, P, P * 4 / shard / GiB, P * 4 / shard / GiB,
                      P * 8 / shard / GiB, act / GiB, gathered / GiB)
