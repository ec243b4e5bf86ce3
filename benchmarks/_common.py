"""Shared helpers for the benchmark scripts: timing (medians), isolated worker processes for peak-memory
measurement, machine facts, and writing results to ``benchmarks/results/``.

Benchmarks are not tests: they print tables and write files; nothing asserts a time.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = int(os.environ.get("SNAPGEN_BENCH_THREADS", "2"))


def setup_torch():
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    return torch


def median_ms(fn, repeats: int = 5, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), times


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_worker(script: str, spec: dict, timeout: float = 3600) -> dict:
    """Run ``python script --worker JSON`` in a fresh process (so peak memory is its own) and parse the
    JSON object it prints on its last stdout line."""
    cmd = [sys.executable, script, "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed for {spec}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def matmul_gflops(n: int = 2048, repeats: int = 7) -> float:
    """This CPU's fp32 matmul rate (median) -- the roofline that model FLOP/s are compared with."""
    torch = setup_torch()
    a, b = torch.randn(n, n), torch.randn(n, n)
    ms, _ = median_ms(lambda: a @ b, repeats=repeats, warmup=2)
    return 2 * n**3 / (ms / 1000) / 1e9


def machine() -> dict:
    torch = setup_torch()
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def md_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for path, text in ((RESULTS / f"{name}.json", json.dumps(payload, indent=2) + "\n"),
                       (RESULTS / f"{name}.md", markdown.rstrip() + "\n")):
        tmp = path.with_name(path.name + ".tmp")  # an interrupted write never leaves half a table
        tmp.write_text(text)
        os.replace(tmp, path)
    print(f"\nwrote {RESULTS / (name + '.md')} and .json")
