"""RoPE, dense GQA attention, KV compression and ASSA against slow, obvious references."""

import pytest
import torch
import torch.nn.functional as F

from snapgen.attention import (AdaptiveSparseSelfAttention, CrossAttention, SelfAttention, apply_rope,
                               assa_attention, attention, bna_mask, compress_tokens, grid_positions,
                               make_geometry, rope_angles)


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------------------- RoPE
def rope_complex(x, pos, theta=10000.0):
    """Textbook RoPE with complex numbers: channel i pairs with i + d/4 inside each axis half."""
    B, N, H, d = x.shape
    f = d // 4
    inv = theta ** (-torch.arange(f, dtype=torch.float64) / f)
    out = []
    for axis in range(2):
        half = x[..., axis * d // 2:(axis + 1) * d // 2]
        z = torch.complex(half[..., :f], half[..., f:])
        rot = torch.polar(torch.ones(N, f, dtype=torch.float64), pos[:, axis, None].double() * inv)
        z = z * rot[:, None]
        out += [z.real, z.imag]
    return torch.cat(out, dim=-1)


def test_rope_matches_complex_rotation():
    x = rand(2, 12, 3, 16)
    pos = grid_positions(3, 4)
    cos, sin = rope_angles(pos, 16)
    torch.testing.assert_close(apply_rope(x, cos.double(), sin.double()), rope_complex(x, pos), rtol=1e-6, atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    d = 16
    q, k = rand(1, 1, 1, d, seed=1), rand(1, 1, 1, d, seed=2)

    def score(pq, pk):
        cq, sq = rope_angles(torch.tensor([pq], dtype=torch.float32), d)
        ck, sk = rope_angles(torch.tensor([pk], dtype=torch.float32), d)
        return (apply_rope(q, cq.double(), sq.double()) * apply_rope(k, ck.double(), sk.double())).sum()

    s1 = score([2.0, 3.0], [5.5, 1.5])
    s2 = score([12.0, -4.0], [15.5, -5.5])  # same offset
    s3 = score([2.0, 3.0], [5.5, 2.5])  # different offset
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(s1, s3)
    # norms are preserved
    c, s = rope_angles(grid_positions(2, 2), d)
    x = rand(1, 4, 2, d)
    torch.testing.assert_close(apply_rope(x, c.double(), s.double()).norm(dim=-1), x.norm(dim=-1))


def test_rope_rejects_bad_head_dim():
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_angles(grid_positions(2, 2), 6)


# ----------------------------------------------------------------------------------------- dense + GQA
def test_gqa_attention_equals_repeated_kv():
    q, k, v = rand(2, 10, 6, 8), rand(2, 7, 2, 8, seed=1), rand(2, 7, 2, 8, seed=2)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(3, 2).transpose(1, 2),
                                         v.repeat_interleave(3, 2).transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(attention(q, k, v), ref)


def test_key_mask_ignores_padding_and_empty_rows_give_zero():
    q, k, v = rand(2, 5, 2, 8), rand(2, 6, 2, 8, seed=1), rand(2, 6, 2, 8, seed=2)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    out = attention(q, k, v, key_mask=mask)
    torch.testing.assert_close(out[0], attention(q[:1], k[:1, :3], v[:1, :3])[0])
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------- compression
def test_compress_tokens_equals_depthwise_conv():
    B, H, W, h, d = 2, 6, 4, 2, 8
    x = rand(B, H * W, h, d)
    conv = torch.nn.Conv2d(h * d, h * d, 2, stride=2, groups=h * d).double()
    ref = conv(x.reshape(B, H, W, h * d).permute(0, 3, 1, 2))  # (B, C, H/2, W/2)
    ref = ref.permute(0, 2, 3, 1).reshape(B, H * W // 4, h, d)
    torch.testing.assert_close(compress_tokens(x, (H, W), conv.weight, conv.bias), ref)


def test_compress_rejects_odd_grid():
    with pytest.raises(ValueError, match="even token grid"):
        compress_tokens(rand(1, 15, 1, 4), (3, 5), torch.ones(4, 1, 2, 2, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------ ASSA
def assa_by_hand(q, k, v, gate_logits, grid, tile, radius, wk, wv, theta=10000.0):
    """ASSA from first principles: conv2d-compressed k/v, RoPE, plain softmax attention for both branches."""
    B, N, Hq, d = q.shape
    H, W = grid
    Hk = k.shape[2]

    def conv(x, w):
        y = F.conv2d(x.reshape(B, H, W, Hk * d).permute(0, 3, 1, 2), w, stride=2, groups=Hk * d)
        return y.permute(0, 2, 3, 1).reshape(B, N // 4, Hk, d)

    def soft(qq, kk, vv, mask=None):
        rep = Hq // Hk
        kk, vv = kk.repeat_interleave(rep, 2), vv.repeat_interleave(rep, 2)
        s = torch.einsum("bnhd,bmhd->bhnm", qq, kk) / d ** 0.5
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), vv)

    cf, sf = (t.double() for t in rope_angles(grid_positions(H, W), d, theta))
    cc, sc = (t.double() for t in rope_angles(grid_positions(H // 2, W // 2, stride=2, offset=0.5), d, theta))
    qr, kr = apply_rope(q, cf, sf), apply_rope(k, cf, sf)
    glob = soft(qr, apply_rope(conv(k, wk), cc, sc), conv(v, wv))
    loc = soft(qr, kr, v, bna_mask(make_geometry(grid, tile, radius)))
    g = torch.sigmoid(gate_logits)[..., None]
    return g * glob + (1 - g) * loc


@pytest.mark.parametrize("grid,tile", [((8, 8), (2, 2)), ((4, 12), (2, 0)), ((6, 10), (4, 4)), ((8, 6), (2, 0))])
@pytest.mark.parametrize("grad", [False, True])  # row chunks without grad take the fused inference mix
def test_assa_matches_hand_written_composition(grid, tile, grad):
    N = grid[0] * grid[1]
    q, k, v = rand(2, N, 4, 16), rand(2, N, 2, 16, seed=1), rand(2, N, 2, 16, seed=2)
    q.requires_grad_(grad)
    gate = rand(2, N, 4, seed=3)
    wk, wv = rand(32, 1, 2, 2, seed=4), rand(32, 1, 2, 2, seed=5)
    cf = [t.double() for t in rope_angles(grid_positions(*grid), 16)]
    cc = [t.double() for t in rope_angles(grid_positions(grid[0] // 2, grid[1] // 2, stride=2, offset=0.5), 16)]
    out = assa_attention(q, k, v, gate, make_geometry(grid, tile, 1), wk, wv, rope=cf, rope_coarse=cc)
    torch.testing.assert_close(out, assa_by_hand(q, k, v, gate, grid, tile, 1, wk, wv))


def test_assa_gate_selects_branches():
    grid, N = (4, 4), 16
    q, k, v = rand(1, N, 2, 8), rand(1, N, 2, 8, seed=1), rand(1, N, 2, 8, seed=2)
    w = torch.full((16, 1, 2, 2), 0.25, dtype=torch.float64)
    geom = make_geometry(grid, (2, 2), 0)
    big = torch.full((1, N, 2), 60.0, dtype=torch.float64)
    only_global = assa_attention(q, k, v, big, geom, w, w)
    only_local = assa_attention(q, k, v, -big, geom, w, w)
    kc, vc = compress_tokens(k, grid, w), compress_tokens(v, grid, w)
    torch.testing.assert_close(only_global, attention(q, kc, vc))
    loc = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=bna_mask(geom)).transpose(1, 2)
    torch.testing.assert_close(only_local, loc)


def test_assa_module_init_and_gradients():
    torch.manual_seed(0)
    m = AdaptiveSparseSelfAttention(32, heads=4, kv_heads=2, head_dim=8, bna_tile=(2, 2)).double()
    # gate starts at an even mix, compression as average pooling
    assert torch.equal(m.gate.weight, torch.zeros_like(m.gate.weight))
    assert torch.equal(m.compress_k.weight, torch.full_like(m.compress_k.weight, 0.25))
    x = rand(2, 24, 32).requires_grad_(True)
    rope = [t.double() for t in rope_angles(grid_positions(4, 6), 8)]
    rope_c = [t.double() for t in rope_angles(grid_positions(2, 3, stride=2, offset=0.5), 8)]
    out = m(x, (4, 6), rope, rope_c)
    assert out.shape == x.shape and out.dtype == torch.float64
    out.square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_self_and_cross_attention_modules():
    torch.manual_seed(0)
    sa = SelfAttention(32, heads=4, kv_heads=1, head_dim=8)
    x = torch.randn(2, 16, 32)
    rope = rope_angles(grid_positions(4, 4), 8)
    assert sa(x, (4, 4), rope).shape == (2, 16, 32)
    ca = CrossAttention(32, text_dim=12, heads=4, head_dim=8)
    text = torch.randn(2, 5, 12)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = ca(x, text, mask)
    text2 = text.clone()
    text2[0, 2:] = 100.0  # padded tokens of sample 0 must not matter
    torch.testing.assert_close(ca(x, text2, mask), out)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        SelfAttention(32, heads=4, kv_heads=3, head_dim=8)
