"""snapgen's fused CPU BNA kernel (backend "fused", and "auto" which picks it) against the float64 reference:
values and gradients over row-chunk geometries, GQA/MQA/MHA, batches, strided inputs, ragged row blocks;
determinism across runs and thread counts; dispatch rules; FLOP counts; the op registrations."""

import functools
import os
import subprocess
import sys

import pytest
import torch
from helpers.builders import make_qkv

from snapgen.attention import assa_attention, bna_mask, block_neighborhood_attention, make_geometry
from snapgen.attention.bna import FUSED_MAX_TILE_TOKENS, use_fused_kernel
from snapgen.attention.cpu_kernel import bna_rows, bna_rows_lerp, kernel_error, load_kernel
from snapgen.utils.flops import flop_counter

pytestmark = pytest.mark.kernel
DISABLED = os.environ.get("SNAPGEN_BNA_KERNEL", "1") in ("0", "false", "off", "no")
needs_kernel = pytest.mark.skipif(DISABLED, reason="fused kernel disabled by SNAPGEN_BNA_KERNEL=0")


@needs_kernel
def test_kernel_builds_and_loads():
    """The project's CI has g++: a kernel that fails to build must fail here, not silently fall back."""
    assert load_kernel(), kernel_error()


# (grid, tile, radius): row chunks of 1-4 rows, non-square grids, radius 0 and 2 (window wider than the
# grid's chunks), a single chunk, and a 320-token chunk (two row blocks, the second one ragged).
GEOMETRIES = [
    ((8, 8), (2, 0), 1),
    ((16, 4), (4, 0), 1),
    ((6, 10), (1, 0), 1),
    ((12, 5), (3, 0), 2),
    ((9, 6), (3, 0), 0),
    ((4, 4), (4, 0), 1),
    ((16, 40), (8, 0), 1),
]
HEADS = [(4, 2), (4, 4), (6, 2), (4, 1)]  # GQA, MHA, 3 query heads per KV head, MQA


qkv = functools.partial(make_qkv, dtype=torch.float32)  # the kernel runs float32 only


def run(backend, geom, q, k, v, w):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = block_neighborhood_attention(q, k, v, geom, backend=backend)
    (out * w).sum().backward()
    return out.detach(), [t.grad for t in (q, k, v)]


@needs_kernel
@pytest.mark.parametrize("grid,tile,radius", GEOMETRIES)
@pytest.mark.parametrize("heads,kv_heads", HEADS)
def test_fused_matches_reference_values_and_grads(grid, tile, radius, heads, kv_heads):
    geom = make_geometry(grid, tile, radius)
    q, k, v = qkv(grid[0] * grid[1], heads, kv_heads, B=1 if grid == (16, 40) else 2)
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    out, grads = run("fused", geom, q, k, v, w)
    ref, ref_grads = run("reference", geom, q.double(), k.double(), v.double(), w.double())
    assert out.dtype == torch.float32 and out.shape == q.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    for name, g, g_ref in zip("qkv", grads, ref_grads):
        assert g.shape == g_ref.shape and g.dtype == torch.float32, name
        torch.testing.assert_close(g, g_ref.float(), rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")


@needs_kernel
def test_fused_takes_strided_views_of_a_fused_projection():
    """q/k/v sliced out of one qkv tensor (token stride 3x the row) give the same result as copies."""
    geom = make_geometry((8, 6), (2, 0), 1)
    g = torch.Generator().manual_seed(3)
    qkv_t = torch.randn(2, 48, 3, 4, 8, generator=g)
    q, k, v = qkv_t[:, :, 0], qkv_t[:, :, 1, :2], qkv_t[:, :, 2, :2]
    assert not q.is_contiguous() and q.stride(-1) == 1
    w = torch.randn(q.shape, generator=g)
    out, grads = run("fused", geom, q, k, v, w)
    out_c, grads_c = run("fused", geom, q.contiguous(), k.contiguous(), v.contiguous(), w)
    torch.testing.assert_close(out, out_c, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, grads_c):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@needs_kernel
def test_fused_is_deterministic_across_runs_and_thread_counts():
    """No atomics: forward and backward are bitwise reproducible, with 1 or 2 threads."""
    geom = make_geometry((16, 8), (4, 0), 1)
    q, k, v = qkv(128, 4, 2)
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (2, 2, 1):
            torch.set_num_threads(threads)
            results.append(run("fused", geom, q, k, v, w))
    finally:
        torch.set_num_threads(before)
    for out, grads in results[1:]:
        assert torch.equal(out, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1]))


@needs_kernel
def test_fused_flops_equal_gather_flops():
    """The registered FLOP formulas count what the gather backend's SDPA calls count (fwd and fwd+bwd)."""
    geom = make_geometry((8, 8), (2, 0), 1)
    q, k, v = (t.requires_grad_(True) for t in qkv(64, 4, 2))
    counts = {}
    for backend in ("gather", "fused"):
        with flop_counter() as fwd:
            with torch.no_grad():
                block_neighborhood_attention(q, k, v, geom, backend=backend)
        with flop_counter() as both:
            block_neighborhood_attention(q, k, v, geom, backend=backend).sum().backward()
        counts[backend] = (fwd.get_total_flops(), both.get_total_flops())
    assert counts["fused"] == counts["gather"] and counts["gather"][0] > 0


@needs_kernel
def test_ops_pass_torch_library_opcheck():
    """Schema, fake-tensor (meta) shapes and dispatcher registration of both ops (torch.library.opcheck)."""
    q, k, v = qkv(64, 4, 2, d=8)
    out, lse = torch.ops.snapgen.bna_rows_forward(q, k, v, 16, 3, 1)
    torch.library.opcheck(torch.ops.snapgen.bna_rows_forward.default, (q, k, v, 16, 3, 1),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.snapgen.bna_rows_backward.default,
                          (torch.randn_like(out), q, k, v, out, lse, 16, 3, 1),
                          test_utils=("test_schema", "test_faketensor"))
    meta = torch.ops.snapgen.bna_rows_forward(*(t.to("meta") for t in (q, k, v)), 16, 3, 1)
    assert meta[0].shape == out.shape and meta[1].shape == lse.shape == (2, 4, 64)


@needs_kernel
def test_fused_rejects_what_it_cannot_run():
    q, k, v = qkv(64, 4, 2)
    with pytest.raises(ValueError, match="row chunks"):
        block_neighborhood_attention(q, k, v, make_geometry((8, 8), (4, 4), 1), backend="fused")
    with pytest.raises(ValueError, match="row chunks"):  # 3-row chunks of an 8-row grid need padding
        block_neighborhood_attention(q, k, v, make_geometry((8, 8), (3, 0), 1), backend="fused")
    with pytest.raises(ValueError, match="float32"):
        block_neighborhood_attention(q.double(), k.double(), v.double(), make_geometry((8, 8), (2, 0), 1),
                                     backend="fused")
    with pytest.raises(RuntimeError, match="tile_tokens must divide"):
        bna_rows(q, k, v, 48, 1, 1)
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        bna_rows(q[:, :, :3], k, v, 16, 3, 1)


@needs_kernel
def test_auto_picks_fused_only_where_it_applies():
    rows, tiles = make_geometry((8, 8), (2, 0), 1), make_geometry((8, 8), (4, 4), 1)
    q, k, v = qkv(64, 4, 2)
    assert use_fused_kernel(q, k, v, rows)
    assert not use_fused_kernel(q, k, v, tiles)  # 2-D tiles
    assert not use_fused_kernel(q.double(), k.double(), v.double(), rows)  # float64
    assert not use_fused_kernel(*(t.to("meta") for t in (q, k, v)), rows)  # meta (FLOP counting in `info`)
    big = make_geometry((64, 64), (FUSED_MAX_TILE_TOKENS // 64 + 1, 0), 1)  # chunks of >= 768 tokens
    x = torch.empty(1, 64 * 64, 1, 1)
    assert big.tile_tokens > FUSED_MAX_TILE_TOKENS and not use_fused_kernel(x, x, x, big)
    seen = []

    def traced(q):  # exporters trace: the exported graph must hold the portable gather backend
        seen.append(use_fused_kernel(q, k, v, rows))
        return q * 2

    torch.jit.trace(traced, (q,), check_trace=False)
    assert seen == [False]


@needs_kernel
def test_assa_auto_matches_gather_values_and_grads():
    """End to end through ASSA (RoPE, compression, gate): the default backend equals the gather backend."""
    geom = make_geometry((8, 8), (2, 0), 1)
    g = torch.Generator().manual_seed(5)
    q, k, v = qkv(64, 4, 2)
    gate = torch.randn(2, 64, 4, generator=g)
    wk, wv = (torch.randn(2 * 16, 1, 2, 2, generator=g) * 0.3 for _ in range(2))
    results = {}
    for backend in ("gather", "auto"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, gate, wk, wv)]
        out = assa_attention(*leaves[:4], geom, *leaves[4:], backend=backend)
        (out * out.detach()).sum().backward()
        results[backend] = (out.detach(), [t.grad for t in leaves])
        with torch.no_grad():  # the inference path (fused: kernel then in-place mix)
            torch.testing.assert_close(assa_attention(*leaves[:4], geom, *leaves[4:], backend=backend), out,
                                       rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results["auto"][0], results["gather"][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results["auto"][1], results["gather"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_kernel_can_be_disabled_and_auto_falls_back():
    """SNAPGEN_BNA_KERNEL=0: no build is attempted, 'auto' runs gather, 'fused' names the switch."""
    code = (
        "import torch, pytest\n"
        "from snapgen.attention import block_neighborhood_attention, make_geometry\n"
        "from snapgen.attention.bna import use_fused_kernel\n"
        "from snapgen.attention.cpu_kernel import kernel_error\n"
        "q = torch.randn(1, 64, 4, 8); k = torch.randn(1, 64, 2, 8)\n"
        "geom = make_geometry((8, 8), (2, 0), 1)\n"
        "assert not use_fused_kernel(q, k, k, geom)\n"
        "ref = block_neighborhood_attention(q, k, k, geom, backend='gather')\n"
        "assert torch.equal(block_neighborhood_attention(q, k, k, geom), ref)\n"
        "with pytest.raises(RuntimeError, match='SNAPGEN_BNA_KERNEL=0'):\n"
        "    block_neighborhood_attention(q, k, k, geom, backend='fused')\n"
        "print('ok', kernel_error())\n"
    )
    env = {**os.environ, "SNAPGEN_BNA_KERNEL": "0"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "ok disabled by SNAPGEN_BNA_KERNEL=0" in res.stdout


@needs_kernel
@pytest.mark.parametrize("grid,tile,radius,heads,kv_heads", [((8, 8), (2, 0), 1, 4, 2), ((12, 5), (3, 0), 2, 6, 2),
                                                             ((16, 40), (8, 0), 1, 2, 1)])
def test_fused_gate_mix_matches_lerp_of_reference(grid, tile, radius, heads, kv_heads):
    """bna_rows_lerp = lerp(BNA, end, weight) in one kernel: values and the gradients of all five inputs, with
    `end` laid out as SDPA returns it (a heads-first buffer seen heads-last), and the no-grad path."""
    from snapgen.attention.cpu_kernel import bna_rows_lerp

    geom = make_geometry(grid, tile, radius)
    N = grid[0] * grid[1]
    g = torch.Generator().manual_seed(11)
    q, k, v = qkv(N, heads, kv_heads, B=2, seed=4)
    end = torch.randn(2, heads, N, 16, generator=g).transpose(1, 2)  # (B, N, Hq, d), not contiguous
    weight = torch.rand(2, N, heads, generator=g)
    w = torch.randn(q.shape, generator=g)

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v, end, weight)]
        out = fn(*leaves)
        (out * w.to(dtype)).sum().backward()
        return out.detach(), [t.grad for t in leaves]

    out, got = grads(lambda *t: bna_rows_lerp(*t, geom.tile_tokens, geom.window[0], geom.radius), torch.float32)
    ref, want = grads(lambda q, k, v, e, wt: torch.lerp(block_neighborhood_attention(q, k, v, geom, backend="reference"),
                                                        e, wt.unsqueeze(-1)), torch.float64)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    for name, a, b in zip(["q", "k", "v", "end", "weight"], got, want):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(bna_rows_lerp(q, k, v, end, weight, geom.tile_tokens, geom.window[0],
                                                 geom.radius), out, rtol=1e-6, atol=1e-6)


@needs_kernel
def test_mix_ops_pass_torch_library_opcheck():
    q, k, v = qkv(64, 4, 2, d=8)
    end, weight = torch.randn_like(q), torch.rand(2, 64, 4)
    args = (q, k, v, end, weight, 16, 3, 1)
    out, local, lse = torch.ops.snapgen.bna_rows_mix_forward(*args, True)
    assert local.shape == out.shape
    assert torch.ops.snapgen.bna_rows_mix_forward(*args, False)[1].numel() == 0  # inference saves nothing
    for save in (True, False):
        torch.library.opcheck(torch.ops.snapgen.bna_rows_mix_forward.default, (*args, save),
                              test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.snapgen.bna_rows_mix_backward.default,
                          (torch.randn_like(out), q, k, v, local, lse, end, weight, 16, 3, 1),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match="weight must be a contiguous"):
        torch.ops.snapgen.bna_rows_mix_forward(q, k, v, end, weight[:, :, :2], 16, 3, 1, False)


def windowed_attention(q, k, v, geom):
    """The definition, one query at a time: softmax over the keys of the query's own window only (``bna_mask``,
    itself checked against a brute-force loop in test_bna.py). Unlike the dense ``reference`` backend, a key
    outside the window takes no part at all -- SDPA's additive mask lets a NaN/Inf there through
    (NaN + -inf = NaN, 0 * Inf = NaN), so the dense reference is no oracle for non-finite inputs."""
    mask = bna_mask(geom)
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    out = torch.empty_like(q)
    for i in range(q.shape[1]):
        keys = mask[i].nonzero().squeeze(1)
        s = torch.einsum("bhd,bmhd->bhm", q[:, i], k[:, keys]) / q.shape[-1] ** 0.5
        out[:, i] = torch.einsum("bhm,bmhd->bhd", s.softmax(-1), v[:, keys])
    return out


# (tensor, index (b, token, head, channel), value): one token's q, one key, one value, and an Inf query
NON_FINITE = [("q", (1, 5, 2, 3), float("nan")), ("k", (0, 40, 1, 7), float("nan")),
              ("v", (1, 20, 0, 1), float("inf")), ("q", (0, 50, 3, 0), float("inf"))]


@needs_kernel
@pytest.mark.parametrize("name,index,value", NON_FINITE)
def test_fused_propagates_nan_and_inf_where_the_definition_does(name, index, value):
    """A NaN/Inf in q, k or v gives non-finite outputs in exactly the positions the definition gives them: the
    kernel is built without -ffinite-math-only (with it, a NaN in q came out as a finite row). 8 chunks, so a
    key reaches some queries and not others; the finite outputs still equal the definition's."""
    geom = make_geometry((16, 4), (2, 0), 1)
    inputs = dict(zip("qkv", qkv(64, 4, 2, d=32)))
    inputs[name][index] = value
    q, k, v = inputs.values()
    want = windowed_attention(q.double(), k.double(), v.double(), geom)
    bad = ~torch.isfinite(want)
    assert 0 < bad.sum() < bad[index[0]].numel() // 2  # some outputs non-finite, most of that image not
    with torch.no_grad():
        for out in (block_neighborhood_attention(q, k, v, geom, backend="fused"),
                    bna_rows_lerp(q, k, v, torch.zeros_like(q), torch.zeros(q.shape[:3]), geom.tile_tokens,
                                  geom.window[0], geom.radius)):  # ASSA's mixed form, gate 0: the local branch
            assert torch.equal(~torch.isfinite(out), bad), (int((~torch.isfinite(out)).sum()), int(bad.sum()))
            torch.testing.assert_close(out[~bad], want[~bad].float(), rtol=1e-5, atol=1e-5)
    # gather (no key outside the window is touched) agrees; the dense masked reference does not for k and v
    assert torch.equal(~torch.isfinite(block_neighborhood_attention(q, k, v, geom, backend="gather")), bad)


def test_a_failed_build_falls_back_with_one_logged_line_and_is_recorded(monkeypatch, caplog):
    """No compiler (here: a build that raises): one warning, status `build-failed` with the error in
    backend_report, `auto` runs gather with the reason recorded, `fused` raises naming the way out."""
    import logging

    import torch.utils.cpp_extension

    from snapgen.attention import backend, backend_report, cpu_kernel

    def broken_build(**kwargs):
        raise OSError("g++: command not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken_build)
    monkeypatch.setitem(cpu_kernel._state, "loaded", False)
    monkeypatch.setitem(cpu_kernel._state, "error", None)
    monkeypatch.setattr(backend, "_choices", {})
    monkeypatch.setenv("SNAPGEN_BNA_KERNEL", "1")
    q, k, v = qkv(64, 4, 2)
    geom = make_geometry((8, 8), (2, 0), 1)
    with caplog.at_level(logging.DEBUG, logger="snapgen.attention"):
        outs = [block_neighborhood_attention(q, k, v, geom) for _ in range(3)]
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "g++: command not found" in warned[0].getMessage()
    assert all(torch.equal(o, block_neighborhood_attention(q, k, v, geom, backend="gather")) for o in outs)
    report = backend_report("auto")
    assert report["kernel_status"] == "build-failed" and "command not found" in report["kernel_error"]
    assert list(report["auto_choices"].values()) == ["gather"]
    assert "fused kernel unavailable: OSError" in next(iter(report["auto_choices"]))
    with pytest.raises(RuntimeError, match="SNAPGEN_BNA_KERNEL=0 or use backend='gather'"):
        block_neighborhood_attention(q, k, v, geom, backend="fused")
