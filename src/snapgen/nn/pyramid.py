"""The Laplacian pyramid of a latent: DFM's decomposition [DFM Sec. 3.1] (arXiv 2506.19839).

A latent ``x`` of S levels is split, coarsest first, into ``X^1 .. X^S``: ``X^1`` is ``x`` averaged down
``S - 1`` times, each finer ``X^s`` the residual of its level against the upsampled coarser one. The partial sum
``recompose(X^1 .. X^s)`` is a low-resolution preview; all S levels recompose ``x`` (lossless up to float
rounding). The operators are the official code's (snap-research/elit ``dfm_utils/laplacian_decomposer.py``):
halving with bilinear interpolation (no antialias) samples midway between pixels, i.e. the mean of each 2x2
block, so *down* is 2x2 average pooling; *up* is bilinear x2 (``align_corners=False``). The 3-D (video) form
halves T, H and W together (2x2x2 mean, trilinear x2): latents ``(B, C, T, H, W)``.

DFM's state is one latent-shaped tensor (:meth:`Pyramid.pack` / :meth:`Pyramid.unpack`): every level brought to
the coarsest level's grid by space-to-depth (``pixel_unshuffle``: level s, ``4 ** (s - 1)`` times the coarsest's
pixels, becomes ``4 ** (s - 1)`` channel groups) and the levels stacked along channels, coarsest first:
``(B, C (1 + 4 + ... + 4 ** (S - 1)), H / 2 ** (S - 1), W / 2 ** (S - 1))`` (8 for 3-D). It is invertible, holds
no padding, and its shape gives back the latent's, so samplers, CFG batching and exported graphs handle it as
any latent; with one level it *is* the latent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Pyramid"]


@dataclass(frozen=True)
class Pyramid:
    """An S-level Laplacian pyramid over 2-D (``dims=2``: ``(B, C, H, W)``) or 3-D (``dims=3``:
    ``(B, C, T, H, W)``) latents. ``levels = 1`` is the identity (plain flow matching)."""

    levels: int = 2
    dims: int = 2

    def __post_init__(self):
        if isinstance(self.levels, bool) or not isinstance(self.levels, int) or self.levels < 1:
            raise ValueError(f"a pyramid needs an integer number of levels >= 1, got {self.levels!r}")
        if self.dims not in (2, 3):
            raise ValueError(f"pyramid dims must be 2 (images) or 3 (video), got {self.dims!r}")

    @property
    def factor(self) -> int:
        """How many times the finest level's size is the coarsest's, per axis (``2 ** (levels - 1)``)."""
        return 2 ** (self.levels - 1)

    # --- sizes ----------------------------------------------------------------------------------------
    def check(self, size) -> tuple[int, ...]:
        """``size``, the latent's spatial (or T, H, W) size, checked to halve ``levels - 1`` times."""
        size = tuple(int(s) for s in size)
        if len(size) != self.dims:
            raise ValueError(f"a {self.dims}-D pyramid takes {'(H, W)' if self.dims == 2 else '(T, H, W)'} "
                             f"latent sizes, got {size}")
        bad = [s for s in size if s <= 0 or s % self.factor]
        if bad:
            f = self.factor
            near = ", ".join(f"{s} -> {' or '.join(str(v) for v in (s // f * f, s // f * f + f) if v > 0)}"
                             for s in dict.fromkeys(bad))
            raise ValueError(f"latent size {'x'.join(map(str, size))} does not divide into a {self.levels}-level "
                             f"pyramid: every side must be a multiple of {f} latent pixels (halved "
                             f"{self.levels - 1} times); nearest valid sides: {near}")
        return size

    def shapes(self, size) -> list[tuple[int, ...]]:
        """Each level's spatial size, coarsest first."""
        size = self.check(size)
        return [tuple(s // 2 ** (self.levels - 1 - k) for s in size) for k in range(self.levels)]

    # --- the two operators ------------------------------------------------------------------------------
    def down(self, x: torch.Tensor) -> torch.Tensor:
        """Halve every spatial axis: the mean of each 2x2 (2x2x2) block."""
        return (F.avg_pool2d if self.dims == 2 else F.avg_pool3d)(x, 2)

    def up(self, x: torch.Tensor) -> torch.Tensor:
        """Double every spatial axis: bilinear (trilinear) interpolation, ``align_corners=False``."""
        return F.interpolate(x, scale_factor=2, mode="bilinear" if self.dims == 2 else "trilinear",
                             align_corners=False)

    # --- decompose / recompose ------------------------------------------------------------------------
    def decompose(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[X^1 (coarsest), ..., X^S (full-resolution residual)]`` of ``x``."""
        self._check_tensor(x)
        out = []
        for _ in range(self.levels - 1):
            low = self.down(x)
            out.append(x - self.up(low))
            x = low
        out.append(x)
        return out[::-1]

    def recompose(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """The latent of the first ``len(levels)`` levels (all of them: ``x``; fewer: a preview at the last given
        level's resolution)."""
        if not 1 <= len(levels) <= self.levels:
            raise ValueError(f"recompose takes 1 to {self.levels} levels, got {len(levels)}")
        x = levels[0]
        for residual in levels[1:]:
            x = self.up(x) + residual
        return x

    def preview(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """The first ``len(levels)`` levels recomposed and brought up to full resolution (finer residuals taken
        as 0): what a progressive sampler shows before the fine levels exist."""
        x = self.recompose(levels)
        for _ in range(self.levels - len(levels)):
            x = self.up(x)
        return x

    # --- the packed state ---------------------------------------------------------------------------------
    @property
    def groups(self) -> list[int]:
        """Channel groups per level in the packed state, coarsest first (``1, 4, 16 ...``; ``1, 8, 64 ...``)."""
        r = 2 ** self.dims
        return [r ** s for s in range(self.levels)]

    def packed_channels(self, channels: int) -> int:
        return channels * sum(self.groups)

    def channel_split(self, channels: int) -> list[int]:
        """Each level's channel count in the packed state of a ``channels``-channel latent."""
        return [channels * g for g in self.groups]

    def packed_shape(self, channels: int, size) -> tuple[int, ...]:
        """The packed state's shape without the batch: ``(C * sum(groups), *coarsest size)``."""
        return (self.packed_channels(channels), *self.shapes(size)[0])

    def latent_channels(self, packed_channels: int) -> int:
        total = sum(self.groups)
        if packed_channels % total:
            raise ValueError(f"a packed {self.levels}-level state has a multiple of {total} channels, got "
                             f"{packed_channels}")
        return packed_channels // total

    def pack(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """Every level space-to-depth'd to the coarsest grid, stacked along channels, coarsest first."""
        if len(levels) != self.levels:
            raise ValueError(f"pack takes all {self.levels} levels, got {len(levels)}")
        return torch.cat([_space_to_depth(lv, 2 ** s, self.dims) for s, lv in enumerate(levels)], dim=1)

    def unpack(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The levels (each at its own resolution) of a packed state."""
        if x.dim() != self.dims + 2:
            raise ValueError(f"a packed {self.dims}-D pyramid state is {self.dims + 2}-D, got shape {tuple(x.shape)}")
        C = self.latent_channels(x.shape[1])
        parts = x.split(self.channel_split(C), dim=1)
        return [_depth_to_space(part, 2 ** s, self.dims) for s, part in enumerate(parts)]

    def _check_tensor(self, x: torch.Tensor) -> None:
        if x.dim() != self.dims + 2:
            raise ValueError(f"a {self.dims}-D pyramid takes {'(B, C, H, W)' if self.dims == 2 else '(B, C, T, H, W)'}"
                             f" latents, got shape {tuple(x.shape)}")
        self.check(x.shape[2:])


def _space_to_depth(x: torch.Tensor, r: int, dims: int) -> torch.Tensor:
    """``(B, C, *size)`` -> ``(B, C r^dims, *size / r)``; channel order (c, sub-pixel offsets), as
    ``pixel_unshuffle`` for 2-D."""
    if r == 1:
        return x
    if dims == 2:
        return F.pixel_unshuffle(x, r)
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T // r, r, H // r, r, W // r, r).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(B, C * r ** 3, T // r, H // r, W // r)


def _depth_to_space(x: torch.Tensor, r: int, dims: int) -> torch.Tensor:
    if r == 1:
        return x
    if dims == 2:
        return F.pixel_shuffle(x, r)
    B, Cr, T, H, W = x.shape
    C = Cr // r ** 3
    x = x.reshape(B, C, r, r, r, T, H, W).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(B, C, T * r, H * r, W * r)
