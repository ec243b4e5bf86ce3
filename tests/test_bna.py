"""Blockwise neighbourhood attention: every backend against one obviously-correct reference."""

import itertools
import warnings

import pytest
import torch
from helpers.builders import make_qkv

from snapgen.attention import bna_mask, block_neighborhood_attention, make_geometry

# (grid, tile, radius): square, non-square, row chunks (0 = whole axis), tiles that do not divide the
# grid (padding), radius 2, and a tile larger than the grid.
CASES = [
    ((8, 8), (4, 4), 1),
    ((6, 10), (2, 4), 1),
    ((8, 8), (2, 0), 1),
    ((16, 4), (4, 0), 1),
    ((5, 7), (2, 3), 2),
    ((6, 6), (4, 4), 1),
    ((4, 4), (8, 8), 1),
    ((12, 8), (4, 4), 0),
]


def brute_force_mask(grid, tile, radius):
    """The definition, one query at a time: tiles are clipped to the grid, the window of (2r+1) tiles per
    axis is shifted inward at the borders, keys are the real tokens of the window's tiles."""
    H, W = grid
    th = H if tile[0] == 0 else min(tile[0], H)
    tw = W if tile[1] == 0 else min(tile[1], W)
    nh, nw = -(-H // th), -(-W // tw)
    wh, ww = min(2 * radius + 1, nh), min(2 * radius + 1, nw)
    mask = torch.zeros(H * W, H * W, dtype=torch.bool)
    for qy, qx in itertools.product(range(H), range(W)):
        ty, tx = qy // th, qx // tw
        sy = min(max(ty - radius, 0), nh - wh)
        sx = min(max(tx - radius, 0), nw - ww)
        for ky, kx in itertools.product(range(H), range(W)):
            if sy <= ky // th < sy + wh and sx <= kx // tw < sx + ww:
                mask[qy * W + qx, ky * W + kx] = True
    return mask


def masked_softmax_attention(q, k, v, mask):
    """Plain-math attention with an explicit mask, no SDPA: the oracle for the reference backend."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) / q.shape[-1] ** 0.5
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), v)


@pytest.mark.parametrize("grid,tile,radius", CASES)
def test_mask_matches_definition(grid, tile, radius):
    geom = make_geometry(grid, tile, radius)
    assert torch.equal(bna_mask(geom), brute_force_mask(grid, tile, radius))


@pytest.mark.parametrize("grid,tile,radius", CASES)
def test_reference_is_masked_attention(grid, tile, radius):
    geom = make_geometry(grid, tile, radius)
    q, k, v = make_qkv(grid[0] * grid[1])
    out = block_neighborhood_attention(q, k, v, geom, backend="reference")
    torch.testing.assert_close(out, masked_softmax_attention(q, k, v, brute_force_mask(grid, tile, radius)))


@pytest.mark.parametrize("grid,tile,radius", CASES)
def test_gather_matches_reference_values_and_grads(grid, tile, radius):
    geom = make_geometry(grid, tile, radius)
    inputs = make_qkv(grid[0] * grid[1])
    grads = {}
    outs = {}
    for backend in ("reference", "gather", "tiles"):
        q, k, v = (t.clone().requires_grad_(True) for t in inputs)
        out = block_neighborhood_attention(q, k, v, geom, backend=backend)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        (out * w).sum().backward()
        outs[backend], grads[backend] = out.detach(), [t.grad for t in (q, k, v)]
    for fast in ("gather", "tiles"):
        torch.testing.assert_close(outs[fast], outs["reference"], rtol=1e-10, atol=1e-10)
        for g_fast, g_ref in zip(grads[fast], grads["reference"]):
            torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("grid,tile,radius", [CASES[0], CASES[1], CASES[4]])
def test_flex_matches_reference_forward(grid, tile, radius):
    geom = make_geometry(grid, tile, radius)
    q, k, v = make_qkv(grid[0] * grid[1], d=32, dtype=torch.float32)
    ref = block_neighborhood_attention(q, k, v, geom, backend="reference")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is unfused; correctness is what we test
        out = block_neighborhood_attention(q, k, v, geom, backend="flex")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_flex_refuses_backward_on_cpu():
    geom = make_geometry((4, 4), (2, 2), 1)
    q, k, v = (t.float().requires_grad_(True) for t in make_qkv(16, d=32))
    with pytest.raises(RuntimeError, match="no backward pass on CPU"):
        block_neighborhood_attention(q, k, v, geom, backend="flex")


def test_local_attention_is_local():
    """A key outside the query's window must not influence the output; one inside must."""
    geom = make_geometry((8, 8), (2, 2), 1)
    q, k, v = make_qkv(64, B=1)
    base = block_neighborhood_attention(q, k, v, geom)
    far, near = 7 * 8 + 7, 0 * 8 + 1  # bottom-right corner vs a neighbour of query 0
    v2 = v.clone()
    v2[:, far] += 10.0
    v2[:, near] += 10.0
    out = block_neighborhood_attention(q, k, v2, geom)
    assert not torch.allclose(out[:, 0], base[:, 0])  # the near key changed query 0
    v3 = v.clone()
    v3[:, far] += 10.0
    torch.testing.assert_close(block_neighborhood_attention(q, k, v3, geom)[:, 0], base[:, 0])


def test_window_has_constant_size_at_borders():
    """Shift-don't-shrink: every query sees the same number of keys when tiles divide the grid."""
    counts = bna_mask(make_geometry((12, 12), (3, 3), 1)).sum(1)
    assert counts.min() == counts.max() == 9 * 9


def test_bad_inputs_raise_clear_errors():
    geom = make_geometry((4, 4), (2, 2), 1)
    q, k, v = make_qkv(16)
    with pytest.raises(ValueError, match="has 16 tokens"):
        block_neighborhood_attention(q[:, :15], k[:, :15], v[:, :15], geom)
    with pytest.raises(ValueError, match="divisible by key heads"):
        block_neighborhood_attention(q[:, :, :3], k, v, geom)
    with pytest.raises(ValueError, match="unknown BNA backend"):
        block_neighborhood_attention(q, k, v, geom, backend="natten")
    with pytest.raises(ValueError, match="radius"):
        make_geometry((4, 4), (2, 2), -1)


@pytest.mark.parametrize("grid,tile,batch", [((8, 6), (2, 0), 1), ((12, 5), (3, 0), 2), ((4, 4), (4, 0), 1),
                                             ((10, 4), (2, 0), 3)])
def test_fused_inference_mix_equals_bna_then_lerp(grid, tile, batch):
    """ASSA's inference path mixes each chunk group's local output straight into the result
    (bna_lerp_into); it must equal the reference BNA followed by the gate mix, including the border groups."""
    from snapgen.attention.bna import bna_lerp_into

    g = torch.Generator().manual_seed(7)
    N = grid[0] * grid[1]
    q, k, v = (torch.randn(batch, N, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    end = torch.randn(batch, N, 4, 8, generator=g, dtype=torch.float64)
    w = torch.rand(batch, N, 4, 1, generator=g, dtype=torch.float64)
    geom = make_geometry(grid, tile, 1)
    ref = torch.lerp(block_neighborhood_attention(q, k, v, geom, backend="reference"), end, w)
    out = bna_lerp_into(q, k, v, geom, end, w)
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="row chunks"):
        bna_lerp_into(q, k, v, make_geometry(grid, (2, 2), 1), end, w)
