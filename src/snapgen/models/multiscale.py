"""DFM's model side [DFM Sec. 3.2, "Architecture"] (arXiv 2506.19839): one patch embedding, one timestep embedder
and one output head per pyramid level around an unchanged patch-based backbone.

A backbone with patch size ``p`` serves an S-level pyramid with patch ``p / 2 ** (S - 1 - s)`` at level s (the
coarsest has the smallest), so every level gives the *same* token grid; the per-level embeddings are summed token
by token (one sequence, not a concatenation), the per-level timestep embeddings are summed into the one
conditioning vector, and every level's head reads the same final tokens (snap-research/elit ``models/sit_dfm.py``:
``MultiScalePatchEmbed``, ``MultiScaleTimestepEmbedder``, ``MultiScaleFinalLayer``). A level not started
(time :data:`~snapgen.sampling.dfm.NOT_STARTED`) is multiplied by 0 before its embedding (only the bias reaches
the sum) and embedded at t = 1, as the official ``zero_out_masked_levels``.

The finest level uses the backbone's own ``patch_embed`` / ``t_embedder`` / ``final_layer`` (passed in, not owned
here), so a plain checkpoint loads into a DFM model with only the coarser levels new, and a one-level DFM model
*is* the plain model. The coarser levels' modules are built by the backbone's factories (elastic widths, per-width
modulation and LoRA then apply to them as to the backbone's own).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..nn.pyramid import Pyramid

__all__ = ["MultiScaleIO", "denoiser_input_shapes", "level_patch_sizes", "to_dfm"]


def level_patch_sizes(patch_size: int, levels: int) -> list[int]:
    """Patch size per level, coarsest first: ``patch_size / 2 ** (levels - 1 - s)`` (every level the same grid)."""
    f = 2 ** (levels - 1)
    if levels < 1 or patch_size % f:
        raise ValueError(f"a {levels}-level DFM model needs a patch size divisible by {f} (one token grid for "
                         f"every level: patch {patch_size} at the finest, {patch_size}/{f} at the coarsest); "
                         f"got patch_size {patch_size}: use fewer dfm_levels or a larger patch_size")
    return [patch_size // 2 ** (levels - 1 - s) for s in range(levels)]


class MultiScaleIO(nn.Module):
    """The coarser levels' embeddings, timestep embedders and heads of an S-level DFM model.

    ``make_embed(p)``: a patch embedding ``(B, C, h, w) -> (B, D, h/p, w/p)``; ``make_time()``: a timestep
    embedder ``(B,) -> (B, D)``; ``make_head(p)``: an output layer ``(tokens, t_emb) -> (B, N, p*p*C)``."""

    def __init__(self, levels: int, patch_size: int, make_embed: Callable[[int], nn.Module],
                 make_time: Callable[[], nn.Module], make_head: Callable[[int], nn.Module], dims: int = 2):
        super().__init__()
        self.pyramid = Pyramid(levels, dims)
        self.patch_sizes = level_patch_sizes(patch_size, levels)
        coarse = self.patch_sizes[:-1]
        self.embeds = nn.ModuleList([make_embed(p) for p in coarse])
        self.t_embedders = nn.ModuleList([make_time() for _ in coarse])
        self.heads = nn.ModuleList([make_head(p) for p in coarse])

    @property
    def levels(self) -> int:
        return self.pyramid.levels

    def split_inputs(self, x: torch.Tensor, t, in_channels: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(levels, times (B, S))`` of a packed state ``x`` and its level times; clear errors otherwise."""
        S = self.levels
        B = x.shape[0]
        want = self.pyramid.packed_channels(in_channels)
        if x.dim() != self.pyramid.dims + 2 or x.shape[1] != want:
            raise ValueError(f"a {S}-level DFM model takes the packed pyramid state (B, {want} = {in_channels} "
                             f"latent channels x {sum(self.pyramid.groups)}, coarsest-level size): "
                             f"snapgen.flow.pyramid.Pyramid({S}).pack(levels); got shape {tuple(x.shape)}")
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.shape != (B, S):
            raise ValueError(f"a {S}-level DFM model takes one time per level, t of shape ({B}, {S}) (a level not "
                             f"started: snapgen.sampling.dfm.NOT_STARTED); got {tuple(t.shape)}")
        return self.pyramid.unpack(x), t

    def embed(self, levels: list[torch.Tensor], t: torch.Tensor, fine_embed: nn.Module,
              fine_time: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens (B, N, D), t_emb (B, D))``: the per-level embeddings and timestep embeddings, summed."""
        embeds = [*self.embeds, fine_embed]
        times = [*self.t_embedders, fine_time]
        started = t <= 1.0
        tokens = t_emb = None
        for s, (level, emb, temb) in enumerate(zip(levels, embeds, times)):
            keep = started[:, s].to(level.dtype).reshape(-1, *([1] * (level.dim() - 1)))
            tok = emb(level * keep).flatten(2).transpose(1, 2)
            te = temb(t[:, s].clamp(max=1.0))
            tokens = tok if tokens is None else tokens + tok
            t_emb = te if t_emb is None else t_emb + te
        return tokens, t_emb

    def heads_out(self, xs: torch.Tensor, t_emb: torch.Tensor, fine_head: nn.Module,
                  unpatchify: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
        """Every level's velocity from the final tokens, packed (``unpatchify(tokens, p)`` -> the level)."""
        outs = [unpatchify(head(xs, t_emb), p) for head, p in zip([*self.heads, fine_head], self.patch_sizes)]
        return self.pyramid.pack(outs)


@torch.no_grad()
def to_dfm(model: nn.Module, levels: int) -> nn.Module:
    """A ``levels``-level DFM copy of a trained plain model (the fine-tuning start [DFM Sec. 4.3, FLUX-DFM]).

    The finest level keeps the model's own embedding, timestep embedder and head; each coarser level (patch ``q``,
    ``r = p / q``) starts so that the DFM model is the plain one on the recomposed input: its embedding is the
    plain embedding of the level nearest-upsampled by ``r`` (the fine kernel summed over ``r x r`` blocks, no bias),
    its timestep embedder outputs 0 (the plain first layer, the last layer zeroed), and its head predicts the ``r x r`` block mean of the
    plain head's velocity. So ``v_fine = plain(up_nearest(X^1) + X^2, t)`` exactly at the start (tests)."""
    if getattr(model.config, "dfm_levels", 1) != 1:
        raise ValueError(f"to_dfm converts a plain model (dfm_levels 1), got dfm_levels {model.config.dfm_levels}")
    ref = next(model.parameters())
    out = type(model)(model.config.replace(dfm_levels=levels)).to(device=ref.device, dtype=ref.dtype)
    missing = out.load_state_dict(model.state_dict(), strict=False).missing_keys
    assert all(k.startswith("dfm.") for k in missing), missing
    io: MultiScaleIO = out.dfm
    fine_w, p = out.patch_embed.weight, io.patch_sizes[-1]
    D, C = fine_w.shape[:2]
    head = out.final_layer
    for s, q in enumerate(io.patch_sizes[:-1]):
        r = p // q
        io.embeds[s].weight.copy_(fine_w.reshape(D, C, q, r, q, r).sum((3, 5)))
        io.embeds[s].bias.zero_()
        te, fine_te = io.t_embedders[s], out.t_embedder  # first layer: the plain one's; last layer: 0
        te.mlp[0].load_state_dict(fine_te.mlp[0].state_dict())
        te.mlp[2].weight.zero_(), te.mlp[2].bias.zero_()
        for name, seq in getattr(te, "mlp_variants", {}).items():
            seq[0].load_state_dict(fine_te.mlp_variants[name][0].state_dict())
            seq[2].weight.zero_(), seq[2].bias.zero_()
        h = io.heads[s]
        h.modulation.copy_(head.modulation)
        for name, table in getattr(head, "modulation_variants", {}).items():
            h.modulation_variants[name].copy_(table)
        w = head.linear.weight.reshape(q, r, q, r, C, -1).mean((1, 3)).reshape(q * q * C, -1)
        h.linear.weight.copy_(w)
        h.linear.bias.copy_(head.linear.bias.reshape(q, r, q, r, C).mean((1, 3)).reshape(-1))
    return out


def denoiser_input_shapes(config, batch: int, latent_shape: tuple) -> tuple[tuple, tuple]:
    """``(x shape, t shape)`` of a denoiser call on ``batch`` latents of ``latent_shape`` ``(C, h, w)``: the latent
    and ``(B,)``, or for a DFM model (``dfm_levels`` S > 1) the packed pyramid state and ``(B, S)``. For code that
    builds example inputs (FLOP counts, memory plans, export graphs)."""
    levels = getattr(config, "dfm_levels", 1)
    if levels == 1:
        return (batch, *latent_shape), (batch,)
    return (batch, *Pyramid(levels).packed_shape(latent_shape[0], latent_shape[1:])), (batch, levels)
