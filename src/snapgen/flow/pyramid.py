"""The Laplacian pyramid of a latent: DFM's decomposition [DFM Sec. 3.1] (arXiv 2506.19839).

A latent ``x`` of S levels is split, coarsest first, into ``X^1 .. X^S``: ``X^1`` is ``x`` averaged down
``S - 1`` times, each finer ``X^s`` the residual of its level against the upsampled coarser one. The partial sum
``recompose(X^1 .. X^s)`` is a low-resolution preview; all S levels recompose ``x`` (lossless up to float
rounding). The operators are the official code's (snap-research/elit ``dfm_utils/laplacian_decomposer.py``):
halving with bilinear interpolation (no antialias) samples midway between pixels, i.e. the mean of each 2x2
block, so *down* is 2x2 average pooling; *up* is bilinear x2 (``align_corners=False``). The 3-D (video) form
halves T, H and W together (2x2x2 mean, trilinear x2): latents ``(B, C, T, H, W)``.

DFM's state is one tensor: the levels flattened and concatenated, ``(B, C, N_1 + ... + N_S)`` with
``N_s`` the level's pixel count (:meth:`Pyramid.pack` / :meth:`Pyramid.unpack`), so a sampler, CFG batching and
an exported graph handle it as any latent.
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

    def numels(self, size) -> list[int]:
        """Each level's pixel count (per channel), coarsest first: the split of the packed state."""
        out = []
        for shape in self.shapes(size):
            n = 1
            for s in shape:
                n *= s
            out.append(n)
        return out

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
    def pack(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """``(B, C, N_1 + ... + N_S)``: every level flattened, coarsest first."""
        if len(levels) != self.levels:
            raise ValueError(f"pack takes all {self.levels} levels, got {len(levels)}")
        return torch.cat([lv.flatten(2) for lv in levels], dim=2)

    def unpack(self, x: torch.Tensor, size) -> list[torch.Tensor]:
        """The levels of a packed ``(B, C, N)`` state of a latent of spatial size ``size``."""
        shapes = self.shapes(size)
        numels = self.numels(size)
        if x.dim() != 3 or x.shape[2] != sum(numels):
            raise ValueError(f"a packed {self.levels}-level state of a {'x'.join(map(str, size))} latent is "
                             f"(B, C, {sum(numels)}), got {tuple(x.shape)}")
        return [part.reshape(*x.shape[:2], *shape) for part, shape in zip(x.split(numels, dim=2), shapes)]

    def packed_size(self, size) -> int:
        return sum(self.numels(size))

    def _check_tensor(self, x: torch.Tensor) -> None:
        if x.dim() != self.dims + 2:
            raise ValueError(f"a {self.dims}-D pyramid takes {'(B, C, H, W)' if self.dims == 2 else '(B, C, T, H, W)'}"
                             f" latents, got shape {tuple(x.shape)}")
        self.check(x.shape[2:])
