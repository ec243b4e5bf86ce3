"""The trainable text side of the diffusion model: per-encoder projections, null embeddings, caption drop."""

from __future__ import annotations

import torch
from torch import nn

from snapgen.utils.random import rand

__all__ = ["TextConditioning"]


class TextConditioning(nn.Module):
    """Turns frozen features of one or more text encoders into the denoiser's ``(text, text_mask)``.

    The encoders' token sequences are projected to ``out_dim`` and concatenated along the token axis, in
    the order of ``encoder_dims`` (several encoders concatenated, each dropped independently in training:
    the model then learns to use any subset, and classifier-free guidance drops them all).

    Args:
        encoder_dims: feature width of each encoder, e.g. ``[384]`` for MiniLM.
        out_dim: the denoiser's ``text_dim``.
        drop_probs: per-encoder probability of replacing a sample's caption by the null embedding during
            training (one float for all encoders, or one per encoder).
        null_length: number of tokens of each learned null embedding (>= 1).
        drop_all_prob: probability of dropping *every* encoder of a sample jointly, on top of the independent
            drops (as SD3 trains its three encoders): with independent drops alone the all-null condition
            that classifier-free guidance queries is seen with probability ``prod(drop_probs)`` (1% for two
            encoders at 0.1). The all-null rate becomes ``1 - (1 - drop_all_prob)(1 - prod(drop_probs))``.
            Default 0 (and then no extra random number is drawn).

    Parameters (saved with the diffusion model; the encoders themselves are not):

    * ``proj[i]``: ``Linear(encoder_dims[i], out_dim)``; ``nn.Identity()`` instead when there is a single
      encoder whose width already equals ``out_dim`` (no parameters; the denoiser's own text LayerNorm and
      cross-attention projections do the rest).
    * ``null_embeddings[i]``: ``(null_length, encoder_dims[i])``, init normal std 0.02. It lives in the
      encoder's feature space and goes through ``proj[i]`` like real features.

    Output length: encoder ``i`` contributes ``max(L_i, null_length)`` positions (right-padded, masked),
    so ``L = sum_i max(L_i, null_length)``; with ``null_length = 1`` that is ``sum_i L_i``.

    A dropped (sample, encoder) gets the null embedding in its first ``null_length`` positions, masked
    in, and the rest of that encoder's positions masked out. A sample with no valid token from some
    encoder (an encoder that returned nothing for an empty caption) is treated as dropped for it, so no
    sample is ever fully masked. Padded output positions are zero.
    """

    def __init__(self, encoder_dims: list[int], out_dim: int, drop_probs: list[float] | float = 0.1,
                 null_length: int = 1, drop_all_prob: float = 0.0):
        super().__init__()
        encoder_dims = [int(d) for d in encoder_dims]
        if not encoder_dims or any(d < 1 for d in encoder_dims):
            raise ValueError(f"encoder_dims must be a non-empty list of positive ints, got {encoder_dims}")
        if int(out_dim) < 1:
            raise ValueError(f"out_dim must be positive, got {out_dim}")
        if isinstance(drop_probs, (int, float)):
            drop_probs = [float(drop_probs)] * len(encoder_dims)
        drop_probs = [float(p) for p in drop_probs]
        if len(drop_probs) != len(encoder_dims):
            raise ValueError(f"got {len(drop_probs)} drop_probs for {len(encoder_dims)} encoders")
        if any(not 0.0 <= p <= 1.0 for p in drop_probs):
            raise ValueError(f"drop_probs must be in [0, 1], got {drop_probs}")
        if not 0.0 <= float(drop_all_prob) <= 1.0:
            raise ValueError(f"drop_all_prob must be in [0, 1], got {drop_all_prob}")
        if int(null_length) < 1:
            raise ValueError(f"null_length must be >= 1 (a fully masked caption is not allowed), "
                             f"got {null_length}")
        self.encoder_dims = encoder_dims
        self.out_dim = int(out_dim)
        self.drop_probs = drop_probs
        self.drop_all_prob = float(drop_all_prob)
        self.null_length = int(null_length)
        single = len(encoder_dims) == 1 and encoder_dims[0] == self.out_dim
        self.proj = nn.ModuleList([nn.Identity() if single else nn.Linear(d, self.out_dim)
                                   for d in encoder_dims])
        self.null_embeddings = nn.ParameterList([nn.Parameter(torch.randn(self.null_length, d) * 0.02)
                                                 for d in encoder_dims])

    @property
    def num_encoders(self) -> int:
        return len(self.encoder_dims)

    def sample_drops(self, batch_size: int, device: torch.device | str | None = None,
                     generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Independent Bernoulli(drop_probs[i]) per encoder and sample, then (when ``drop_all_prob > 0``) one
        joint Bernoulli(drop_all_prob) per sample that drops every encoder; from ``generator`` (on its device)
        or torch's global RNG, placed on ``device`` (the generator's device when ``device`` is None)."""
        dev = device if device is not None or generator is None else generator.device

        def draw():
            return rand(batch_size, generator, device=dev)

        drops = [draw() < p for p in self.drop_probs]
        if self.drop_all_prob > 0:
            every = draw() < self.drop_all_prob
            drops = [d | every for d in drops]
        return drops

    def _check(self, features, drop):
        if len(features) != self.num_encoders:
            raise ValueError(f"expected features from {self.num_encoders} encoders, got {len(features)}")
        B = None
        for i, (tokens, mask) in enumerate(features):
            if tokens.dim() != 3 or tokens.shape[2] != self.encoder_dims[i]:
                raise ValueError(f"features[{i}] tokens must be (B, L, {self.encoder_dims[i]}), "
                                 f"got {tuple(tokens.shape)}")
            if tuple(mask.shape) != tuple(tokens.shape[:2]):
                raise ValueError(f"features[{i}] mask must be {tuple(tokens.shape[:2])}, "
                                 f"got {tuple(mask.shape)}")
            if B is None:
                B = tokens.shape[0]
            elif tokens.shape[0] != B:
                raise ValueError(f"features[{i}] has batch size {tokens.shape[0]}, features[0] has {B}")
        if drop is not None:
            if len(drop) != self.num_encoders:
                raise ValueError(f"drop must hold one (B,) bool tensor per encoder ({self.num_encoders}), "
                                 f"got {len(drop)}")
            for i, d in enumerate(drop):
                if tuple(torch.as_tensor(d).shape) != (B,):
                    raise ValueError(f"drop[{i}] must have shape ({B},), "
                                     f"got {tuple(torch.as_tensor(d).shape)}")
        return B

    def forward(self, features: list[tuple[torch.Tensor, torch.Tensor]],
                drop: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``features[i] = (tokens (B, L_i, encoder_dims[i]), mask (B, L_i))`` -> ``(tokens (B, L, out_dim),
        mask (B, L))``.

        ``drop[i]`` (bool ``(B,)``) forces which samples get encoder ``i``'s null embedding. When ``drop``
        is None, samples are dropped at random with ``drop_probs`` in training mode (torch's global RNG:
        seed it for reproducibility) and never in eval mode.
        """
        B = self._check(features, drop)
        weight = self.null_embeddings[0]
        device, dtype = weight.device, weight.dtype
        if drop is None:
            drop = self.sample_drops(B, device) if self.training else [None] * self.num_encoders
        out_tokens, out_masks = [], []
        for i, (tokens, mask) in enumerate(features):
            tokens = tokens.to(device=device, dtype=dtype)
            mask = mask.to(device=device, dtype=torch.bool)
            L = tokens.shape[1]
            Lo = max(L, self.null_length)
            if Lo > L:
                tokens = torch.cat([tokens, tokens.new_zeros(B, Lo - L, tokens.shape[2])], 1)
                mask = torch.cat([mask, mask.new_zeros(B, Lo - L)], 1)
            d = ~mask.any(1)
            if drop[i] is not None:
                d = d | torch.as_tensor(drop[i], device=device, dtype=torch.bool)
            null_tokens, null_mask = self._null_padded(i, Lo, device, dtype)
            tokens = torch.where(d[:, None, None], null_tokens[None], tokens)
            mask = torch.where(d[:, None], null_mask[None], mask)
            x = self.proj[i](tokens).masked_fill(~mask[..., None], 0.0)
            out_tokens.append(x)
            out_masks.append(mask)
        return torch.cat(out_tokens, 1), torch.cat(out_masks, 1)

    def _null_padded(self, i: int, length: int, device, dtype):
        n = self.null_length
        tokens = torch.zeros(length, self.encoder_dims[i], device=device, dtype=dtype)
        tokens = torch.cat([self.null_embeddings[i].to(dtype), tokens[n:]], 0)
        mask = torch.arange(length, device=device) < n
        return tokens, mask

    def null(self, batch_size: int, lengths: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The all-null condition (classifier-free guidance's unconditional branch): ``(B, L, out_dim)``
        tokens and mask.

        Default ``L = num_encoders * null_length`` (no padding). Pass ``lengths`` (the ``L_i`` of a
        conditional batch) to get the same shape as ``forward`` for that batch, e.g. to concatenate the
        conditional and unconditional batches (it is computed by ``forward`` with every drop True).
        Both give the same denoiser output (up to float rounding): padded positions are masked out of
        cross-attention.
        """
        if lengths is None:
            lengths = [self.null_length] * self.num_encoders
        if len(lengths) != self.num_encoders:
            raise ValueError(f"lengths must have one entry per encoder ({self.num_encoders}), "
                             f"got {len(lengths)}")
        device = self.null_embeddings[0].device
        features = [(torch.zeros(batch_size, max(int(L), self.null_length), d, device=device),
                     torch.zeros(batch_size, max(int(L), self.null_length), dtype=torch.bool, device=device))
                    for L, d in zip(lengths, self.encoder_dims)]
        all_dropped = [torch.ones(batch_size, dtype=torch.bool, device=device)] * len(lengths)
        return self.forward(features, drop=all_dropped)

    def extra_repr(self) -> str:
        return f"encoder_dims={self.encoder_dims}, out_dim={self.out_dim}, drop_probs={self.drop_probs}, " \
               f"null_length={self.null_length}"
