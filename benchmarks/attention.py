"""Dense self-attention vs ASSA on this CPU, for the `small` preset's heads (16 x 64, 8 KV heads).

Both sides take the same projected q, k, v (B, N, heads, d); the work both share in the model -- the
projections and the RoPE rotation of q and k -- is excluded. ASSA is measured as the model runs it: 2x2 KV
compression + global attention, blockwise neighbourhood attention, sigmoid-gated mix (only the RoPE of the
compressed keys, about 1% of its time, is left out). Dense and ASSA runs alternate, so drift of this
shared VM's speed hits both alike. FLOPs are counted with torch's flop counter (matmuls/attention) on the work each
function actually performs; ``flop_ratio = dense FLOPs / ASSA FLOPs``; the goal is
``speedup >= 0.9 * flop_ratio`` at 4096 and 16384 tokens, forward and forward+backward.

    python benchmarks/attention.py                      # full table -> benchmarks/results/attention.{md,json}
    python benchmarks/attention.py --tokens 4096 --json # one JSON object (default geometry, the model's
                                                        # default backend "auto"; --backend to choose)
    python benchmarks/attention.py --kernels            # the flash kernel alone on each problem shape
    python benchmarks/attention.py --tokens 4096 --backend flex --device cuda --json   # one GPU row

With a CUDA device the full table also gets GPU rows (bf16 by default, ``--cuda-dtype``): dense SDPA vs ASSA
with the compiled flex_attention local branch (what ``auto`` runs there) and with ``gather``, row chunks and
2-D tiles, forward and forward+backward, timed with ``torch.cuda.synchronize``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, md_table, median_ms, setup_torch, write_results  # noqa: E402

torch = setup_torch()
from snapgen.utils.memory import retain_freed_memory  # noqa: E402
from snapgen.attention import assa_attention, attention, make_geometry  # noqa: E402
from snapgen.attention.bna import auto_backend  # noqa: E402
from snapgen.attention.cpu_kernel import bna_rows, kernel_error, load_kernel  # noqa: E402
from snapgen.models import PRESETS  # noqa: E402
from snapgen.utils.flops import flop_counter  # noqa: E402

CFG = PRESETS["small"]
REPEATS = {1024: 10, 4096: 9, 16384: 5}


def make_inputs(tokens: int, grad: bool, device: str = "cpu", dtype=None):
    side = int(math.isqrt(tokens))
    if side * side != tokens:
        raise SystemExit(f"--tokens must be a square number (a square token grid), got {tokens}")
    g = torch.Generator().manual_seed(0)
    Hq, Hk, d = CFG.heads, CFG.kv_heads, CFG.head_dim
    q = torch.randn(1, tokens, Hq, d, generator=g)
    k = torch.randn(1, tokens, Hk, d, generator=g)
    v = torch.randn(1, tokens, Hk, d, generator=g)
    gate = torch.randn(1, tokens, Hq, generator=g)
    wk = torch.full((Hk * d, 1, 2, 2), 0.25)
    wv = torch.full((Hk * d, 1, 2, 2), 0.25)
    leaves = [t.to(device, dtype or torch.float32) for t in (q, k, v, gate, wk, wv)]  # drawn on CPU: same values
    q, k, v, gate, wk, wv = leaves
    if grad:
        for t in leaves:
            t.requires_grad_(True)
    return (side, side), q, k, v, gate, wk, wv


def dense_fn(inp):
    _, q, k, v, _, _, _ = inp
    return attention(q, k, v)


def assa_fn(inp, tile, backend):
    grid, q, k, v, gate, wk, wv = inp
    geom = make_geometry(grid, tile, CFG.bna_radius)
    return assa_attention(q, k, v, gate, geom, wk, wv, backend=backend, compile=backend == "flex")


def timed_round_robin(fns, repeats: int, sync=None) -> list[float]:
    """Median ms of each no-argument callable, timed in turn (a, b, ..., a, b, ...) after one warmup each,
    so drift of this shared VM's speed hits all of them alike. ``sync`` (``torch.cuda.synchronize`` for GPU
    work) runs inside each timed call, so the time is the device's, not the launch's."""
    if sync is not None:
        fns = [lambda fn=fn: (fn(), sync()) for fn in fns]
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns):
            t.append(median_ms(fn, repeats=1, warmup=0)[0])
    return [statistics.median(t) for t in times]


def timed_pair(fn_a, fn_b, inp, grad: bool, repeats: int, sync=None) -> tuple[float, float]:
    """Medians of ``fn_a(inp)`` and ``fn_b(inp)`` (forward, or forward + backward of the sum), alternating."""
    def runner(fn):
        def run():
            if grad:
                fn(inp).sum().backward()
            else:
                with torch.no_grad():
                    fn(inp)
        return run

    return tuple(timed_round_robin([runner(fn_a), runner(fn_b)], repeats, sync))


def flops(fn, inp, grad: bool) -> int:
    with flop_counter() as fc:
        if grad:
            fn(inp).sum().backward()
        else:
            with torch.no_grad():
                fn(inp)
    return fc.get_total_flops()


def resolved_backend(tokens: int, tile, backend: str, device: str = "cpu") -> str:
    """What ``backend`` runs as for this geometry ("auto" resolves to "flex", "fused" or "gather")."""
    if backend != "auto":
        return backend
    side = int(math.isqrt(tokens))
    x = torch.empty(1, tokens, 1, CFG.head_dim, device=device)
    return auto_backend(x, x, x, make_geometry((side, side), tile, CFG.bna_radius))


def measure(tokens: int, grad: bool, tile, backend: str, device: str = "cpu", dtype=None):
    inp = make_inputs(tokens, grad, device, dtype)
    reps = REPEATS.get(tokens, 3)
    fn = lambda i: assa_fn(i, tile, backend)  # noqa: E731
    sync = torch.cuda.synchronize if device == "cuda" else None
    dense_ms, assa_ms = timed_pair(dense_fn, fn, inp, grad, reps, sync)
    dense_flops = flops(dense_fn, inp, grad)
    assa_flops = flops(lambda i: assa_fn(i, tile, "gather"), inp, grad)  # the sparse algorithm's own work
    ratio = dense_flops / assa_flops
    speedup = dense_ms / assa_ms
    if backend == "auto":
        backend = f"auto ({resolved_backend(tokens, tile, backend, device)})"
    return {"tokens": tokens, "pass": "fwd+bwd" if grad else "fwd", "backend": backend, "tile": list(tile),
            "device": device, "dtype": str(inp[1].dtype).replace("torch.", ""),
            "dense_ms": round(dense_ms, 2), "assa_ms": round(assa_ms, 2), "speedup": round(speedup, 3),
            "flop_ratio": round(ratio, 3), "efficiency": round(speedup / ratio, 3),
            "dense_gflops": round(dense_flops / dense_ms / 1e6, 1), "assa_gflops": round(assa_flops / assa_ms / 1e6, 1)}


def kernel_rates(tokens: int, repeats: int = 5) -> list[dict]:
    """The three attention problems alone, as one SDPA each on contiguous heads-first tensors, fwd+bwd,
    timed round-robin: dense (N x N), ASSA's global branch (N x N/4) and its local branch (chunks x
    T x 3T) -- how fast the flash kernel runs each shape on this CPU, without anything around it."""
    import torch.nn.functional as F

    side = int(math.isqrt(tokens))
    geom = make_geometry((side, side), CFG.bna_tile, CFG.bna_radius)
    T, n = geom.tile_tokens, geom.n_tiles[0]
    Hq, Hk, d = CFG.heads, CFG.kv_heads, CFG.head_dim
    shapes = {"dense": (1, tokens, tokens), "global": (1, tokens, tokens // 4),
              "local": (n, T, geom.keys_per_query)}
    g = torch.Generator().manual_seed(0)
    cases = {}
    for name, (C, Tq, Tk) in shapes.items():
        q = torch.randn(C, Hq, Tq, d, generator=g, requires_grad=True)
        k, v = (torch.randn(C, Hk, Tk, d, generator=g, requires_grad=True) for _ in range(2))
        go = torch.randn(C, Hq, Tq, d, generator=g)
        fn = (lambda q=q, k=k, v=v, go=go: torch.autograd.grad(
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True), (q, k, v), go))
        with flop_counter() as fc:  # the same counting as the ASSA table (runs the case once: the warmup)
            fn()
        cases[name] = (fn, fc.get_total_flops())
    if load_kernel():  # the same local problem through snapgen's fused kernel (heads-last, one call)
        q = torch.randn(1, tokens, Hq, d, generator=g, requires_grad=True)
        k, v = (torch.randn(1, tokens, Hk, d, generator=g, requires_grad=True) for _ in range(2))
        go = torch.randn(1, tokens, Hq, d, generator=g)
        fn = (lambda q=q, k=k, v=v, go=go: torch.autograd.grad(
            bna_rows(q, k, v, T, geom.window[0], geom.radius), (q, k, v), go))
        with flop_counter() as fc:
            fn()
        shapes["local (fused)"] = shapes["local"]
        cases["local (fused)"] = (fn, fc.get_total_flops())
    medians = timed_round_robin([fn for fn, _ in cases.values()], repeats)
    rates = [fl / ms / 1e6 for (_, fl), ms in zip(cases.values(), medians)]
    return [{"tokens": tokens, "problem": name, "shape": list(shapes[name]), "ms": round(ms, 1),
             "gflops": round(rate, 1), "vs_dense": round(rate / rates[0], 3)}  # "dense" is the first case
            for name, ms, rate in zip(cases, medians, rates)]


def main_kernels(allocator: str):
    rows = [r for tokens in (4096, 16384) for r in kernel_rates(tokens)]
    for r in rows:
        print(json.dumps(r), flush=True)
    table = md_table(["tokens", "problem", "batch x queries x keys", "fwd+bwd ms", "GFLOP/s", "rate vs dense"],
                     [[r["tokens"], r["problem"], " x ".join(map(str, r["shape"])), r["ms"], r["gflops"],
                       r["vs_dense"]] for r in rows])
    m = machine()
    md = (f"# Flash-attention kernel rates on ASSA's problem shapes\n\n{m['cpu']}, {m['threads']} threads, torch "
          f"{m['torch']}, fp32, medians of 5 round-robin repeats; allocator: {allocator}; {m['date']}.\n\n"
          f"`python benchmarks/attention.py --kernels`. One SDPA call each ({CFG.heads} query heads, "
          f"{CFG.kv_heads} KV heads, head size {CFG.head_dim}), contiguous heads-first inputs, forward + "
          f"backward; `local (fused)` is the same local problem through snapgen's fused BNA kernel "
          f"(`snapgen.attention.cpu_kernel`, one call on heads-last tensors, no window gradient). ASSA's own time "
          f"is the global and local kernels plus its extra passes over memory (`attention.md`).\n\n{table}\n")
    print("\n" + table)
    write_results("attention_kernels", {"machine": m, "allocator": allocator, "rows": rows}, md)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, help="one token count (square grid); prints one JSON object with --json")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--backend", default="auto", choices=("auto", "gather", "fused", "tiles", "flex"),
                    help="BNA backend for --tokens (default: auto, the model's default)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device for --tokens (default: cpu)")
    ap.add_argument("--cuda-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                    help="dtype of the GPU rows (default: bfloat16)")
    ap.add_argument("--no-flex", action="store_true", help="skip the compiled flex_attention backend")
    ap.add_argument("--kernels", action="store_true",
                    help="time the flash kernel alone on the dense, global and local problem shapes "
                         "-> benchmarks/results/attention_kernels.{md,json}")
    ap.add_argument("--glibc-malloc", action="store_true",
                    help="leave glibc's allocator at its defaults (one mmap per large tensor, page faults on "
                         "every reuse) instead of snapgen's training setting (snapgen.utils.memory)")
    args = ap.parse_args()
    if args.kernels and args.tokens:
        ap.error("--kernels measures 4096 and 16384 tokens itself; drop --tokens (or drop --kernels)")
    allocator = "glibc default" if args.glibc_malloc else "freed memory retained"
    if not args.glibc_malloc and not retain_freed_memory():
        allocator = "platform default"
    if args.kernels:
        main_kernels(allocator)
        return
    warnings.filterwarnings("ignore")
    default_tile = CFG.bna_tile

    if not load_kernel():
        print(f"note: fused BNA kernel unavailable ({kernel_error()}); 'auto' runs 'gather'", file=sys.stderr)
    cuda_dtype = getattr(torch, args.cuda_dtype)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    if args.tokens:
        dtype = cuda_dtype if args.device == "cuda" else None
        fwd = measure(args.tokens, False, default_tile, args.backend, args.device, dtype)
        bwd = measure(args.tokens, True, default_tile, args.backend, args.device, dtype)
        out = {k: fwd[k] for k in ("tokens", "device", "dtype", "dense_ms", "assa_ms", "speedup", "flop_ratio")}
        out.update({"backend": fwd["backend"], "tile": list(default_tile), "allocator": allocator, "fwd_bwd": {
            k: bwd[k] for k in ("dense_ms", "assa_ms", "speedup", "flop_ratio")}})
        print(json.dumps(out) if args.json else out)
        return

    rows = []
    for tokens in (1024, 4096, 16384):
        tiles_2d = (8, 8)  # the 2-D tile alternative (3x3 tiles of 8x8 around each query tile)
        for grad in (False, True):
            for tile, backend in [(default_tile, "auto"), (default_tile, "gather"), (default_tile, "fused"),
                                  (tiles_2d, "gather"), (default_tile, "reference"), (default_tile, "flex")]:
                if backend == "fused" and not load_kernel():
                    continue
                if backend == "flex" and (grad or args.no_flex):
                    continue  # flex has no CPU backward
                if backend == "reference" and tokens > 4096 and grad:
                    continue  # O(N^2) masked reference: forward only at 16k tokens
                try:
                    r = measure(tokens, grad, tile, backend)
                except Exception as e:  # report, don't hide: e.g. a flex compile failure
                    print(f"[{tokens} {backend} {tile}] failed: {type(e).__name__}: {e}", file=sys.stderr)
                    continue
                rows.append(r)
                print(json.dumps(r), flush=True)
    if torch.cuda.is_available():  # GPU rows: compiled flex (what auto runs on CUDA) against gather
        for tokens in (1024, 4096, 16384):
            for grad in (False, True):
                for tile, backend in [(default_tile, "flex"), (default_tile, "gather"), ((8, 8), "flex"),
                                      ((8, 8), "gather")]:
                    try:
                        r = measure(tokens, grad, tile, backend, "cuda", cuda_dtype)
                    except Exception as e:  # report, don't hide: e.g. a flex compile failure
                        print(f"[cuda {tokens} {backend} {tile}] failed: {type(e).__name__}: {e}", file=sys.stderr)
                        continue
                    rows.append(r)
                    print(json.dumps(r), flush=True)

    headers = ["tokens", "pass", "device", "backend", "tile", "dense ms", "ASSA ms", "speedup", "FLOP ratio",
               "speedup/ratio", "dense GFLOP/s", "ASSA GFLOP/s"]
    table = md_table(headers, [[r["tokens"], r["pass"], f"{r['device']} {r['dtype']}", r["backend"],
                                "x".join(map(str, r["tile"])).replace("x0", "xW"),
                                r["dense_ms"], r["assa_ms"], r["speedup"], r["flop_ratio"], r["efficiency"],
                                r["dense_gflops"], r["assa_gflops"]] for r in rows])
    goal = [r for r in rows if r["tokens"] in (4096, 16384) and r["backend"].startswith("auto")
            and tuple(r["tile"]) == tuple(default_tile) and r["device"] == "cpu"]
    met = all(r["efficiency"] >= 0.9 for r in goal)
    summary = ", ".join(f"{r['tokens']} {r['pass']}: {r['efficiency']:.2f}" for r in goal)
    m = machine()
    md = (f"# Dense attention vs ASSA (small preset: {CFG.heads} heads x {CFG.head_dim}, {CFG.kv_heads} KV heads)\n\n"
          f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}, fp32, batch 1, medians of "
          f"{REPEATS} repeats; allocator: {allocator}; {m['date']}.\n\n"
          f"`python benchmarks/attention.py{' --glibc-malloc' if args.glibc_malloc else ''}`. Tile `4xW` = chunks of 4 full rows (default; the paper's 16 "
          f"blocks at 64x64), `8x8` = 2-D tiles. Radius 1. `auto` is the model's default: the fused CPU kernel for row chunks "
          f"under 768 tokens, else `gather` (flash attention on strided windows). The `reference` backend computes the full masked N^2 attention, so its "
          f"speedup is expected below 1; `flex` is compiled flex_attention (forward only on CPU). Rows on `cuda` "
          f"(when a GPU is present): `flex` is what `auto` runs there, `gather` the portable path.\n\n{table}\n\n"
          f"Goal (default geometry, default backend `auto`, 4096 and 16384 tokens, fwd and fwd+bwd): speedup >= 0.9 x "
          f"FLOP ratio: **{'met' if met else 'NOT met'}** "
          f"({summary}).\n")
    print("\n" + table)
    config = {"heads": CFG.heads, "kv_heads": CFG.kv_heads, "head_dim": CFG.head_dim, "radius": CFG.bna_radius}
    write_results("attention_glibc" if args.glibc_malloc else "attention",
                  {"machine": m, "allocator": allocator, "config": config, "rows": rows, "goal_met": met}, md)


if __name__ == "__main__":
    main()
