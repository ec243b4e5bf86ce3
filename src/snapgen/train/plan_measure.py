"""Meta-device measurements for the memory planner (:mod:`snapgen.train.plan`), taken from the real model code
without allocating memory:

* :func:`saved_tensor_bytes`: what one training sample keeps for backward (every tensor autograd saves
  during a forward: activations, and the weights saved once per forward), with or without checkpointing;
* :func:`forward_peak_bytes`: the peak of what a forward *without* gradient holds at once -- a frozen
  teacher's working set, the critic's score, backward simulation. Nothing is kept for backward there, so the
  peak is the largest set of tensors alive together, tracked op by op (``TorchDispatchMode``: each new
  tensor's bytes are added when an op creates it and removed when it is freed).

Attention: on the meta device ``scaled_dot_product_attention`` takes the math path and materialises (and,
in training, saves) the ``(B, heads, N, N)`` score matrix, which the flash / memory-efficient kernels that a
GPU runs in bf16 never hold: they save the query, key, value, output and the log-sum-exp per query row.
Both measurements therefore replace SDPA by :class:`FusedAttention`, which creates and saves exactly those
(``fused_attention=False`` keeps the math path: an upper bound, within 15% of a real CPU forward at small
sizes, tests/test_plan.py; at 1024 px the score matrices double the full model's activations).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["activation_bytes_per_sample", "saved_tensor_bytes", "forward_peak_bytes", "FusedAttention"]


def _is_parameter(t: torch.Tensor) -> bool:
    return isinstance(t, torch.nn.Parameter) or isinstance(getattr(t, "_base", None), torch.nn.Parameter)


def saved_tensor_bytes(model, latent_shape: tuple[int, int, int], text_len: int, checkpointing: bool = False,
                       fused_attention: bool = True) -> tuple[int, int]:
    """``(activations, weights)``: bytes (fp32) that one training sample keeps for backward, measured by
    recording every tensor autograd saves during a forward of the real model on the meta device (nothing is
    allocated), split into activations (grow with the batch) and the weights autograd saves for the inputs'
    gradients (a linear layer keeps its weight; once per forward, whatever the batch). With gradient
    checkpointing a block keeps only its input, and one block's saved tensors exist at a time (recompute).
    Parameters that do not require gradients (a frozen base under LoRA) save what autograd saves for them.
    ``fused_attention``: SDPA as a GPU's fused kernel (:class:`FusedAttention`), else the math path."""
    blocks = [*model.down_blocks, *model.middle_blocks, *model.up_blocks]
    per_block = {id(b): [0, 0] for b in blocks}
    block_inputs = {id(b): 0 for b in blocks}
    current: list = [None]
    outside = [0, 0]

    def pack(t):
        n, kind = t.numel() * t.element_size(), int(_is_parameter(t))
        (outside if current[0] is None else per_block[current[0]])[kind] += n
        return t

    def pre(module, args):
        current[0] = id(module)
        block_inputs[id(module)] = args[0].numel() * args[0].element_size()

    def post(module, args, out):
        current[0] = None

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(pre), b.register_forward_hook(post))]
    from ..models.multiscale import denoiser_input_shapes

    cfg = model.config
    x_shape, t_shape = denoiser_input_shapes(cfg, 1, tuple(latent_shape))  # DFM: the packed pyramid state
    x = torch.randn(x_shape, device="meta")
    t = torch.rand(t_shape, device="meta")
    text = torch.randn(1, text_len, cfg.text_dim, device="meta")
    attention = FusedAttention() if fused_attention else contextlib.nullcontext()
    try:
        with torch.enable_grad(), attention, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, t, {"text": text})
    finally:
        for h in handles:
            h.remove()
    if not checkpointing:
        return outside[0] + sum(a for a, _ in per_block.values()), outside[1] + sum(w for _, w in per_block.values())
    heaviest = max(per_block.values(), key=sum, default=[0, 0])  # the block being recomputed
    return outside[0] + sum(block_inputs.values()) + heaviest[0], outside[1] + heaviest[1]


def activation_bytes_per_sample(model, latent_shape: tuple[int, int, int], text_len: int,
                                checkpointing: bool = False, fused_attention: bool = True) -> int:
    """Everything one sample's forward saves for backward (:func:`saved_tensor_bytes`, both parts), in fp32."""
    return sum(saved_tensor_bytes(model, latent_shape, text_len, checkpointing, fused_attention))


class _FusedSDPA(torch.autograd.Function):
    """What flash / memory-efficient attention creates and saves: the output and the fp32 log-sum-exp of each
    query row; backward recomputes the scores from q, k, v (shapes only: this runs on the meta device)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the planner never runs backward
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class FusedAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` as a fused GPU kernel: an output of the query's shape (value width)
    and, when gradients are on, saved q, k, v, output and log-sum-exp -- no score matrix (flash attention keeps
    only tiles in on-chip memory). Masks, scale, GQA and causality do not change these sizes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(("query", "key", "value")))
            return _FusedSDPA.apply(q, k, v)
        return func(*args, **kwargs)


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensors created inside the mode that are still alive; ``peak`` is their maximum. Results
    that alias an input (views, in-place ops: the op schema's alias annotations) are not counted again."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        outs = out if len(returns) > 1 else (out,)
        inputs = {id(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for ret, o in zip(returns, outs):
            if ret.alias_info is not None:
                continue
            for t in pytree.tree_leaves(o):
                if isinstance(t, torch.Tensor) and id(t) not in inputs:
                    n = t.numel() * t.element_size()
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, n)
        return out


def forward_peak_bytes(fn) -> tuple[int, int]:
    """``(peak, kept)``: the most bytes alive at once while ``fn()`` runs without gradient on meta tensors (SDPA
    fused), and the bytes of what it returns (kept by the caller: a teacher's targets). Tensors that exist
    before the call (weights, inputs) are not counted."""
    mode = _LiveBytes()
    with torch.no_grad(), FusedAttention(), mode:
        out = fn()
    kept = sum(t.numel() * t.element_size() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
    return mode.peak, kept
