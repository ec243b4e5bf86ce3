"""FLOP counting that also sees PyTorch's CPU flash-attention kernel.

``torch.utils.flop_counter`` registers formulas for the CUDA SDPA kernels only; on CPU,
``scaled_dot_product_attention`` runs ``_scaled_dot_product_flash_attention_for_cpu`` and would count as
zero. We map it (and its backward) to torch's own SDPA formulas, so counts agree on CPU, on the meta
device (where SDPA decomposes into counted matmuls) and on GPU.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["flop_counter"]

aten = torch.ops.aten


def _cpu_flash(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter(display: bool = False) -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts CPU flash attention (and snapgen's fused BNA kernel, whose formulas
    register with torch when :mod:`snapgen.attention.cpu_kernel` is imported -- which ``import snapgen`` does,
    so they exist before any mode copies the table). Use as a context manager."""
    return FlopCounterMode(display=display, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
    })
