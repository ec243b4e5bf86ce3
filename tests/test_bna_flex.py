"""BNA backend "flex" (flex_attention with a cached block mask: the CUDA path) against the reference: values and
q/k/v gradients over row chunks, 2-D tiles, padded and odd grids, GQA/MQA, batches; its mask against the
reference mask; the block-mask cache; when flex is compiled (device, SNAPGEN_FLEX_COMPILE; created once); and
that "auto" runs flex on CUDA. On CPU flex runs eagerly; the device-parametrised tests also run on CUDA
(compiled) where a GPU exists, and are skipped there otherwise."""

import warnings

import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex

from snapgen.attention import (assa_attention, backend, backend_report, bna_mask, block_neighborhood_attention, flex,
                               make_geometry)
from snapgen.attention.tiling import _gather_tables

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA device"))]

# (grid, tile, radius, heads, kv_heads, batch)
GEOMETRIES = [
    ((8, 8), (2, 0), 1, 4, 2, 2),   # row chunks: raster order is tile-major (no gather), GQA, batch 2
    ((16, 8), (4, 4), 1, 4, 4, 1),  # 2-D tiles, MHA
    ((6, 10), (4, 4), 1, 4, 2, 2),  # 2-D tiles that divide neither axis: padded keys masked, padded queries dropped
    ((9, 6), (2, 0), 1, 6, 2, 1),   # row chunks that do not divide the rows (padding), 3 query heads per KV head
    ((5, 7), (2, 3), 2, 2, 1, 3),   # odd sizes, radius 2 (the window is a whole axis), MQA, batch 3
    ((12, 8), (4, 4), 0, 4, 2, 2),  # radius 0: each tile attends to itself only
]


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    """torch refuses flex's backward on CPU at its API (``_validate_device``), and so does snapgen; the eager
    flex op underneath has a dense, device-agnostic backward. Lifting both refusals lets CPU test our layout's
    and mask's gradients through flex itself (on CUDA nothing is lifted: the compiled kernels run)."""
    monkeypatch.setattr(torch_flex, "_validate_device", lambda *args: None)
    monkeypatch.setattr(flex, "_refuse_cpu_backward", lambda *args: None)


def inputs(N, heads, kv_heads, batch, device, dtype, d=16):
    g = torch.Generator().manual_seed(N + heads)
    shapes = [(batch, N, heads, d), (batch, N, kv_heads, d), (batch, N, kv_heads, d), (batch, N, heads, d)]
    q, k, v, w = (torch.randn(s, generator=g, dtype=torch.float64) for s in shapes)
    return [t.to(device, dtype) for t in (q, k, v)], w.to(device, dtype)


def values_and_grads(backend_name, geom, qkv, w):
    leaves = [t.detach().clone().requires_grad_(True) for t in qkv]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is unfused; correctness is what is tested
        out = block_neighborhood_attention(*leaves, geom, backend=backend_name)
    (out * w).sum().backward()
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grid,tile,radius,heads,kv_heads,batch", GEOMETRIES)
def test_flex_matches_reference_values_and_grads(cpu_flex_backward, device, grid, tile, radius, heads, kv_heads,
                                                 batch):
    """CPU: eager flex in float64 (exact to rounding). CUDA: compiled flex in float32 against the float64 CPU
    reference."""
    geom = make_geometry(grid, tile, radius)
    dtype = torch.float64 if device == "cpu" else torch.float32
    qkv, w = inputs(grid[0] * grid[1], heads, kv_heads, batch, device, dtype)
    out, grads = values_and_grads("flex", geom, qkv, w)
    ref, ref_grads = values_and_grads("reference", geom, [t.cpu().double() for t in qkv], w.cpu().double())
    tol = 1e-10 if device == "cpu" else 2e-4
    assert out.device.type == device and out.dtype == dtype and out.shape == qkv[0].shape
    torch.testing.assert_close(out.cpu().double(), ref, rtol=tol, atol=tol)
    for name, g, g_ref in zip("qkv", grads, ref_grads):
        assert g.shape == g_ref.shape, name
        torch.testing.assert_close(g.cpu().double(), g_ref, rtol=tol, atol=tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("grid,tile,radius", [g[:3] for g in GEOMETRIES])
def test_flex_mask_is_the_reference_mask_in_tile_major_order(grid, tile, radius):
    """The block mask's mask_mod, evaluated on every (query, key) pair, equals bna_mask once tile-major positions
    are mapped back to tokens: real keys as the reference says, padded keys never (padded query rows are dropped
    from the output, so they are not compared)."""
    geom = make_geometry(grid, tile, radius)
    (H, W), Wp = geom.grid, geom.padded_grid[1]
    token = torch.from_numpy(_gather_tables(geom)[0])  # tile-major position -> padded raster id
    r, c = token // Wp, token % Wp
    real = (r < H) & (c < W)
    ids = torch.where(real, r * W + c, 0)  # real raster id (0 for padding, masked out below)
    want = bna_mask(geom)[ids[:, None], ids[None, :]] & real[None, :]
    block_mask = flex.flex_block_mask(geom, "cpu", len(token))
    got = torch_flex.create_mask(block_mask.mask_mod, None, None, len(token), len(token), device="cpu")[0, 0]
    assert torch.equal(got[real], want[real])


def test_flex_block_mask_skips_blocks_outside_the_windows():
    """At 32x32 tokens in 4-row chunks (128 tokens, one 128-token block each), a query block sees 3 of the 8 key
    blocks: flex computes 3/8 of the dense work (interior) and skips the rest."""
    geom = make_geometry((32, 32), (4, 0), 1)
    block_mask = flex.flex_block_mask(geom, "cpu", 1024)
    assert block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum() == 8 * 3
    assert block_mask.sparsity() > 60


@pytest.mark.parametrize("device", DEVICES)
def test_block_masks_are_cached_per_geometry_device_and_length(device):
    a, b = make_geometry((8, 8), (4, 4), 1), make_geometry((8, 8), (2, 0), 1)
    dev = str(torch.empty(0, device=device).device)  # "cuda:0", as tensors name their device
    first = flex.flex_block_mask(a, dev, 64)
    assert flex.flex_block_mask(a, dev, 64) is first
    assert flex.flex_block_mask(b, dev, 64) is not first
    assert flex.flex_block_mask(make_geometry((8, 8), (4, 4), 1), dev, 64) is first  # equal geometry, same mask
    if device == "cuda":
        assert flex.flex_block_mask(a, "cpu", 64) is not first
    with pytest.raises(ValueError, match="has 64"):
        flex.flex_block_mask(a, dev, 48)
    hits = flex.flex_block_mask.cache_info().hits
    q = torch.randn(1, 64, 2, 16, device=device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block_neighborhood_attention(q, q, q, a, backend="flex")
    assert flex.flex_block_mask.cache_info().hits == hits + 1  # the backend reused the cached mask


def test_flex_compiles_on_cuda_only_unless_the_env_var_says(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.delenv("SNAPGEN_FLEX_COMPILE", raising=False)
    assert flex.flex_compiles(cuda) and not flex.flex_compiles(cpu)
    assert flex.flex_compiles(cpu, compile=True) and not flex.flex_compiles(cuda, compile=False)
    monkeypatch.setenv("SNAPGEN_FLEX_COMPILE", "1")
    assert flex.flex_compiles(cpu) and flex.flex_compiles(cuda)
    monkeypatch.setenv("SNAPGEN_FLEX_COMPILE", "off")
    assert not flex.flex_compiles(cuda)
    monkeypatch.setenv("SNAPGEN_FLEX_COMPILE", "sometimes")
    with pytest.raises(ValueError, match="SNAPGEN_FLEX_COMPILE"):
        flex.flex_compiles(cuda)


def test_cpu_never_compiles_by_default_and_the_compiled_flex_is_created_once(monkeypatch):
    """No torch.compile of flex on CPU unless asked (here it would fail the test); with SNAPGEN_FLEX_COMPILE=1 it
    is created once for any number of calls (a stand-in returns eager flex, so nothing really compiles) and
    runs with dynamo's recompile limit raised, restored afterwards."""
    import torch._dynamo

    geom = make_geometry((6, 10), (4, 4), 1)
    q, k, v = (torch.randn(2, 60, h, 16, generator=torch.Generator().manual_seed(h)) for h in (4, 2, 2))
    ref = block_neighborhood_attention(q, k, v, geom, backend="reference")

    real_compile = torch.compile  # eager flex itself runs torch.compile(backend="eager") on its op: leave it be

    def no_compile(fn, **kwargs):
        assert fn is not torch_flex.flex_attention, "flex_attention compiled on CPU"
        return real_compile(fn, **kwargs)

    calls, limits = [], []

    def fake_compile(fn, **kwargs):
        if fn is not torch_flex.flex_attention:
            return real_compile(fn, **kwargs)
        calls.append(kwargs)

        def run(*args, **kw):
            limits.append(torch._dynamo.config.recompile_limit)
            return fn(*args, **kw)
        return run

    flex.compiled_flex_attention.cache_clear()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            monkeypatch.delenv("SNAPGEN_FLEX_COMPILE", raising=False)
            monkeypatch.setattr(torch, "compile", no_compile)
            torch.testing.assert_close(block_neighborhood_attention(q, k, v, geom, backend="flex"), ref)
            monkeypatch.setenv("SNAPGEN_FLEX_COMPILE", "1")
            monkeypatch.setattr(torch, "compile", fake_compile)
            before = torch._dynamo.config.recompile_limit
            for _ in range(3):
                torch.testing.assert_close(block_neighborhood_attention(q, k, v, geom, backend="flex"), ref)
            block_neighborhood_attention(q, k, v, geom, backend="flex", compile=False)  # the argument wins
    finally:
        flex.compiled_flex_attention.cache_clear()  # never leave the stand-in cached for later tests
    assert calls == [{"dynamic": False}] and limits == [max(64, before)] * 3
    assert torch._dynamo.config.recompile_limit == before


def test_flex_still_refuses_backward_on_cpu_with_a_clear_error():
    geom = make_geometry((4, 4), (2, 2), 1)
    q = torch.randn(1, 16, 2, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward pass on CPU.*backend='auto' or 'gather'"):
        block_neighborhood_attention(q, q, q, geom, backend="flex")


def test_auto_on_cuda_chooses_flex_for_the_dtypes_and_heads_it_runs():
    assert backend._cuda_choice(torch.float32, 64)[1] == "flex"
    assert backend._cuda_choice(torch.bfloat16, 16)[1] == "flex"
    reason, choice = backend._cuda_choice(torch.float64, 64)
    assert choice == "gather" and "float64" in reason
    assert backend._cuda_choice(torch.float16, 8)[1] == "gather"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_auto_runs_flex_on_cuda_and_records_it(monkeypatch):
    """End to end through ASSA on CUDA: 'auto' runs compiled flex (seen by the call it makes and in
    backend_report) and equals the gather backend, values and gradients."""
    monkeypatch.setattr(backend, "_choices", {})
    ran = []
    real = flex.bna_flex
    monkeypatch.setattr("snapgen.attention.bna.bna_flex", lambda *a, **kw: ran.append(1) or real(*a, **kw))
    geom = make_geometry((16, 16), (4, 0), 1)
    g = torch.Generator().manual_seed(5)
    leaves0 = [torch.randn(s, generator=g) for s in [(2, 256, 4, 32), (2, 256, 2, 32), (2, 256, 2, 32), (2, 256, 4)]]
    leaves0 += [torch.randn(64, 1, 2, 2, generator=g) * 0.3 for _ in range(2)]
    results = {}
    for name in ("gather", "auto"):
        leaves = [t.cuda().requires_grad_(True) for t in leaves0]
        out = assa_attention(*leaves[:4], geom, *leaves[4:], backend=name)
        (out * out.detach()).sum().backward()
        results[name] = (out.detach(), [t.grad for t in leaves])
    assert ran, "auto did not run flex on CUDA"
    assert backend_report("auto")["auto_choices"] == {backend._FLEX: "flex"}
    torch.testing.assert_close(results["auto"][0], results["gather"][0], rtol=2e-4, atol=2e-4)
    for a, b in zip(results["auto"][1], results["gather"][1]):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)
