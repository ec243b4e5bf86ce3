"""2-D rotary position embedding (RoPE) for tokens laid out on an image grid.

The head dimension ``d`` is split into two halves: the first half is rotated by the token's row
coordinate, the second half by its column coordinate. Inside each half the usual "rotate-half"
pairing is used (channel ``i`` is paired with channel ``i + d/4``), with ``d/4`` frequencies
``theta ** (-2k / (d/2))``.

Coordinates are floats, so a token can sit between grid points: the global branch of ASSA places a
compressed key (one 2x2 cell of the grid) at the cell centre ``(2i + 0.5, 2j + 0.5)``, in the same
coordinate frame as the full-resolution queries.
"""

from __future__ import annotations

import torch

__all__ = ["grid_positions", "rope_angles", "apply_rope"]


def grid_positions(height: int, width: int, *, stride: float = 1.0, offset: float = 0.0,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Raster-order ``(row, col)`` coordinates of a ``height x width`` grid, shape ``(height*width, 2)``.

    ``stride`` and ``offset`` map grid indices to coordinates (``coord = index * stride + offset``);
    ``stride=2, offset=0.5`` gives the centres of 2x2 cells of a grid twice as large.
    """
    rows = torch.arange(height, device=device, dtype=torch.float32) * stride + offset
    cols = torch.arange(width, device=device, dtype=torch.float32) * stride + offset
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([rr.reshape(-1), cc.reshape(-1)], dim=-1)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables ``(C, S)`` of shape ``(N, 1, head_dim)`` for ``positions`` of shape ``(N, 2)``.

    ``C`` holds the cosines and ``S`` the signed sines, already laid out over the full head dimension, so
    :func:`apply_rope` is ``x * C + swap(x) * S``. Compute them once per grid and share them across blocks.
    """
    if head_dim % 4 != 0:
        raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got head_dim={head_dim}")
    n_freq = head_dim // 4
    inv_freq = theta ** (-torch.arange(n_freq, device=positions.device, dtype=torch.float32) / n_freq)
    angles = positions.float()[:, :, None, None] * inv_freq  # (N, axis, 1, d/4)
    c, s = angles.cos(), angles.sin()
    N = positions.shape[0]
    C = torch.cat([c, c], dim=2).reshape(N, 1, head_dim)  # layout (axis, pair, d/4)
    S = torch.cat([-s, s], dim=2).reshape(N, 1, head_dim)
    return C, S


def apply_rope(x: torch.Tensor, C: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``(B, N, heads, d)`` (heads-last) by the tables from :func:`rope_angles`.

    ``swap`` exchanges the two members of each pair (a ``flip`` of a size-2 axis, much cheaper on CPU than
    stacking the halves): three passes over ``x``, which matters when these tensors are tens of MB.
    """
    B, N, H, d = x.shape
    if C.shape[0] != N:
        raise ValueError(f"RoPE table has {C.shape[0]} positions but the input has {N} tokens")
    # (B*N) merged so the view stays rank 5 (Core ML's limit)
    swapped = x.reshape(B * N, H, 2, 2, d // 4).flip(-2).reshape(B, N, H, d)
    return torch.addcmul(x * C.to(x.dtype), swapped, S.to(x.dtype))
