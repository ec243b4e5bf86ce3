#!/usr/bin/env python
"""The GPU check (issue 19 §6): run the library's GPU paths for real and print one table.

    bash scripts/gpu_check.sh                  # one or more NVIDIA GPUs, ~5-8 minutes, no network
    python scripts/gpu_check.py --smoke        # the same checks at toy sizes on the CPU (CI runs this)

Checks, each with its median step time, peak GPU memory and pass/fail:

* ``flow-bf16``   flow-matching training, 20 steps, bf16, preset ``small`` at 512 px (latents 64x64x16);
* ``elastic``     the same model as an elastic supernetwork (tiny / small / full every step), 20 steps;
* ``dmd``         DMD (10 steps; its adapter is K-DMD's few-step teacher), then ``kdmd``: K-DMD, 20 steps;
* ``generate``    1024 px generation with ``small`` in 4 steps (CFG, batch 1);
* ``bna``         the local attention branch on this device against the reference (forward and gradients);
* ``resume``      exact resume after a SIGKILL: a run killed after its second checkpoint and resumed ends with
                  the weights and losses of an uninterrupted run;
* ``torchrun``    ``torchrun --nproc-per-node 2`` (nccl, FSDP2) when two GPUs exist (skipped otherwise).

It runs from the source tree (``src/`` is put on the path), needs no network, no diffusers, no demo data and
no MiniLM: text features are random (a tiny random BERT with a word-level tokenizer built here), latents are
random (what is checked is the machinery, not image quality). Exits 1 when a check fails; writes the table
to ``--out`` (default ``benchmarks/results/gpu.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

# sizes of the real check and of --smoke (CPU, seconds)
FULL = {"preset": "snapgenpp/small", "elastic": ["snapgenpp/small", [["tiny", 0.375], ["small", 0.5]]], "res": 512, "gen_res": 1024, "steps": 20, "batch": 8, "distill_batch": 4,
        "precision": "bf16", "text_dim": 64, "samples": 64}
SMOKE = {"preset": "snapgenpp/nano", "elastic": ["snapgenpp/nano-elastic", None], "res": 64, "gen_res": 64, "steps": 3, "batch": 2, "distill_batch": 2,
         "precision": "fp32", "text_dim": 32, "samples": 16}
WORDS = "a an the red green blue yellow purple orange circle square triangle star heart above below left right " \
        "of to two three one big small cat dog photo".split()


# --------------------------------------------------------------------------------------------- fixtures
def tiny_text_encoder(directory: Path, hidden: int) -> Path:
    """A random 1-layer BERT with a word-level tokenizer, saved as a local transformers folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", model_max_length=64)
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, intermediate_size=2 * hidden,
                         vocab_size=len(vocab), max_position_embeddings=64)).save_pretrained(directory)
    return directory


def latent_cache(path: Path, n: int, channels: int, size: int, text_dim: int, seed: int = 0) -> Path:
    from snapgen.data.latent_cache import save_latent_cache

    g = torch.Generator().manual_seed(seed)
    captions = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(5)) for i in range(8)]
    tokens = torch.randn(len(captions), 6, text_dim, generator=g)
    mask = torch.ones(len(captions), 6, dtype=torch.bool)
    mask[::2, 4:] = False
    tokens[~mask] = 0
    return save_latent_cache(path, torch.randn(n, channels, size, size, generator=g),
                             torch.randint(0, len(captions), (n,), generator=g), tokens, mask, captions)


def model_spec(s: dict, elastic: bool) -> dict:
    """The ``model:`` section: the preset, or the elastic supernetwork (a preset + its variants)."""
    if not elastic:
        return {"preset": s["preset"]}
    preset, variants = s["elastic"]
    return {"preset": preset, **({"elastic_variants": variants} if variants else {})}


def model_config(s: dict, elastic: bool):
    from snapgen.models.registry import resolve_config

    return resolve_config(model_spec(s, elastic))[1]


def random_vae(cfg):
    """A small random autoencoder with the model's latent channels and factor (decode cost is not the point)."""
    from snapgen.vae import Autoencoder, AutoencoderConfig

    return Autoencoder(AutoencoderConfig(channels=(8,) * cfg.vae_factor.bit_length(), latent_channels=cfg.in_channels,
                                         groups=4))


def base_pipeline(work: Path, s: dict, encoder: Path) -> Path:
    """An elastic pipeline folder (random weights) with a latent cache: what dmd / kdmd distil."""
    from snapgen.models import ThreeStageDiT
    from snapgen.pipelines import PipelineConfig, TextToImagePipeline
    from snapgen.text import TextConditioning

    cfg = model_config(s, elastic=True)
    torch.manual_seed(0)
    kw = {"encoder_dims": [s["text_dim"]], "out_dim": cfg.text_dim}
    d = work / "base"
    TextToImagePipeline(ThreeStageDiT(cfg), TextConditioning(**kw), random_vae(cfg),
                        PipelineConfig(text_encoder=str(encoder), conditioning=kw, resolution=(s["res"],) * 2,
                                       steps=8, guidance=3.0)).save_pretrained(d)
    latent_cache(d / "cache.safetensors", s["samples"], cfg.in_channels, s["res"] // cfg.vae_factor, s["text_dim"])
    return d


def flow_config(work: Path, s: dict, run: str, device: str, elastic: bool = False, **extra) -> dict:
    cfg = model_config(s, elastic)
    cache = work / f"latents_{cfg.in_channels}_{s['res']}.safetensors"
    if not cache.is_file():
        latent_cache(cache, s["samples"], cfg.in_channels, s["res"] // cfg.vae_factor, s["text_dim"])
    feature_dir = work / "features"
    feature_dir.mkdir(exist_ok=True)
    (feature_dir / "config.json").write_text(json.dumps({"hidden_size": s["text_dim"]}))
    return {"task": "flow", "run_dir": str(work / run), "seed": 3, "steps": s["steps"], "batch_size": s["batch"],
            "device": device, "precision": s["precision"], "model": model_spec(s, elastic),
            "text": {"encoder": str(feature_dir), "drop_prob": 0.2}, "data": {"cache": str(cache)},
            "optim": {"lr": 1e-4, "warmup": 2, "schedule": "constant"}, "log_every": 1,
            "ckpt_every": 10_000, "sample_every": 0, **extra}


def distill_config(work: Path, s: dict, base: Path, task: str, run: str, steps: int, device: str, **d) -> dict:
    return {"task": task, "run_dir": str(work / run), "seed": 1, "steps": steps, "batch_size": s["distill_batch"],
            "device": device, "precision": s["precision"], "model": {"init_from": str(base)},
            "data": {"cache": str(base / "cache.safetensors"), "resolution": s["res"]},
            "optim": {"lr": 1e-4, "betas": [0.0, 0.99], "weight_decay": 0.0, "warmup": 0, "schedule": "constant",
                      "grad_clip": 10.0},
            "distill": {"student_lora": {"rank": 8, "alpha": 16}, "critic_lora": {"rank": 8, "alpha": 16},
                        "gen_every": 2, "teacher_guidance": 3.0, **d},
            "log_every": 1, "ckpt_every": 10_000, "sample_every": 0}


# --------------------------------------------------------------------------------------------- measuring
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def step_times(run_dir: Path) -> list[float]:
    """Seconds per optimizer step from the run's metrics (``elapsed`` is logged every step here)."""
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    el = [r["elapsed"] for r in recs]
    return [b - a for a, b in zip(el, el[1:])]


def train(cfg: dict) -> dict:
    """One in-process training run; its median step time (the first steps, warm-up and compilation, left out)."""
    import math

    from snapgen.train.config import TrainConfig
    from snapgen.train.trainer import Trainer

    Trainer(TrainConfig.from_dict(cfg), progress=False).fit(resume=False)
    times = step_times(Path(cfg["run_dir"]))
    recs = [json.loads(ln) for ln in (Path(cfg["run_dir"]) / "metrics.jsonl").read_text().splitlines() if ln]
    bad = [r["step"] for r in recs if not math.isfinite(r["loss"])]
    if bad:
        raise RuntimeError(f"non-finite loss at steps {bad}")
    return {"step_s": statistics.median(times[len(times) // 3:]) if times else None,
            "note": f"{len(recs)} steps, last loss {recs[-1]['loss']:.4f}"}


# --------------------------------------------------------------------------------------------- the checks
def check_flow(ctx):
    return train(flow_config(ctx.work, ctx.s, "flow", ctx.device))


def check_elastic(ctx):
    return train(flow_config(ctx.work, ctx.s, "elastic", ctx.device, elastic=True))


def check_dmd(ctx):
    ctx.base = base_pipeline(ctx.work, ctx.s, ctx.encoder)
    out = train(distill_config(ctx.work, ctx.s, ctx.base, "dmd", "dmd", max(2, ctx.s["steps"] // 2), ctx.device,
                               variants=["full"]))
    ctx.fewstep = ctx.work / "dmd" / "final"
    return out


def check_kdmd(ctx):
    if getattr(ctx, "fewstep", None) is None:
        raise RuntimeError("needs the dmd check (its adapter is the few-step teacher)")
    return train(distill_config(ctx.work, ctx.s, ctx.base, "kdmd", "kdmd", ctx.s["steps"], ctx.device,
                                variants=["tiny", "small", "full"], few_step_teacher=str(ctx.fewstep)))


def check_generate(ctx):
    """``small`` (random weights) at the generation size, 4 Euler steps with CFG; median of 3 calls."""
    from snapgen.models import ThreeStageDiT
    from snapgen.pipelines import PipelineConfig, TextToImagePipeline
    from snapgen.text import TextConditioning

    cfg = model_config(ctx.s, elastic=False)
    kw = {"encoder_dims": [ctx.s["text_dim"]], "out_dim": cfg.text_dim}
    pipe = TextToImagePipeline(ThreeStageDiT(cfg), TextConditioning(**kw), random_vae(cfg),
                               PipelineConfig(text_encoder=str(ctx.encoder), conditioning=kw,
                                              resolution=(ctx.s["gen_res"],) * 2, steps=4, guidance=4.0))
    dtype = torch.bfloat16 if ctx.s["precision"] == "bf16" else torch.float32
    pipe.to(ctx.device, dtype)
    times = []
    for i in range(3):
        _sync(ctx.device)
        t0 = time.perf_counter()
        z = pipe(["a red circle above a blue square"], steps=4, seed=i, return_latents=True, progress=False)
        _sync(ctx.device)
        times.append(time.perf_counter() - t0)
    if not torch.isfinite(z.float()).all():
        raise RuntimeError("non-finite latents")
    return {"step_s": statistics.median(times), "note": f"{ctx.s['gen_res']} px, 4 steps, {str(dtype)[6:]}: seconds per image"}


def check_bna(ctx):
    """The local attention branch (BNA) with backend ``auto`` on this device against the float64 reference,
    forward and gradients, on a row-chunk geometry (the model's) and a 2-D tile geometry; the time of one
    forward + backward of ``auto`` against ``gather`` at the 1024 px token grid of the model (128 x 128)."""
    from snapgen.attention import block_neighborhood_attention as bna
    from snapgen.attention import make_geometry
    from snapgen.attention.backend import backend_report

    dev = torch.device(ctx.device)
    worst = 0.0
    for grid, tile, radius in (((32, 32), (8, 0), 1), ((24, 40), (8, 8), 1)):
        geom = make_geometry(grid, tile, radius)
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, grid[0] * grid[1], h, 64, generator=g) for h in (8, 4, 4))
        ref = [t.double().requires_grad_() for t in (q, k, v)]
        fast = [t.to(dev).requires_grad_() for t in (q, k, v)]
        out_ref, out = bna(*ref, geom, backend="reference"), bna(*fast, geom, backend="auto")
        w = torch.randn(out_ref.shape, generator=g)
        (out_ref * w.double()).sum().backward()
        (out * w.to(dev)).sum().backward()
        errs = [float((out.double().cpu() - out_ref.detach()).abs().max())]
        errs += [float((a.grad.double().cpu() - b.grad).abs().max()) for a, b in zip(fast, ref)]
        worst = max(worst, *errs)
        if max(errs) > 2e-3:
            raise RuntimeError(f"BNA auto differs from the reference on grid {grid} tile {tile}: max err "
                               f"(out, dq, dk, dv) {['%.2g' % e for e in errs]}")
    n = 128 if not ctx.smoke else 16
    geom = make_geometry((n, n), (8, 0), 1)
    q, k, v = (torch.randn(1, n * n, h, 64, device=dev, requires_grad=True) for h in (16, 8, 8))
    times = {}
    for backend in ("auto", "gather"):
        ts = []
        for _ in range(5):
            _sync(ctx.device)
            t0 = time.perf_counter()
            bna(q, k, v, geom, backend=backend).sum().backward()
            _sync(ctx.device)
            ts.append(time.perf_counter() - t0)
        times[backend] = statistics.median(ts[1:])
    chosen = sorted(set(backend_report()["auto_choices"].values())) or ["?"]
    return {"step_s": times["auto"], "note": f"auto = {'/'.join(chosen)}; max err vs fp64 {worst:.1g}; "
                                             f"fwd+bwd {n}x{n} tokens: auto {times['auto'] * 1e3:.1f} ms, "
                                             f"gather {times['gather'] * 1e3:.1f} ms"}


def check_resume(ctx):
    """A run in a child process, SIGKILLed after its second checkpoint, then resumed, against one run
    uninterrupted: the losses after the kill and the final weights must agree."""
    from safetensors.torch import load_file

    from snapgen.train.checkpoint import list_checkpoints

    steps, every = 12, 4
    runs = {}
    for name in ("straight", "killed"):
        cfg = flow_config(ctx.work, ctx.s, f"resume_{name}", ctx.device, steps=steps, ckpt_every=every,
                          keep_checkpoints=10, precision="fp32")
        path = ctx.work / f"resume_{name}.json"
        path.write_text(json.dumps(cfg))
        runs[name] = (cfg, path)
    cmd = [sys.executable, "-m", "snapgen.train", "--no-progress", "--config"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    subprocess.run([*cmd, str(runs["straight"][1])], env=env, check=True, capture_output=True, timeout=600)
    killed_dir = Path(runs["killed"][0]["run_dir"])
    proc = subprocess.Popen([*cmd, str(runs["killed"][1])], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while len(list_checkpoints(killed_dir / "checkpoints")) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    if proc.poll() is not None:
        raise RuntimeError(f"the run ended (exit {proc.returncode}) before it could be killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(list_checkpoints(killed_dir / "checkpoints")[-1].name.split("_")[1])
    subprocess.run([*cmd, str(runs["killed"][1])], env=env, check=True, capture_output=True, timeout=600)
    la, lb = ({json.loads(ln)["step"]: json.loads(ln)["loss"] for ln in
               (Path(runs[n][0]["run_dir"]) / "metrics.jsonl").read_text().splitlines()} for n in ("straight", "killed"))
    after = [k for k in la if k > killed_at]
    loss_diff = max(abs(la[k] - lb[k]) for k in after)
    wa, wb = (load_file(str(list_checkpoints(Path(runs[n][0]["run_dir"]) / "checkpoints")[-1] / "model.safetensors"))
              for n in ("straight", "killed"))
    w_diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    exact = loss_diff == 0 and w_diff == 0
    if not (exact or (loss_diff < 1e-4 and w_diff < 1e-5)):
        raise RuntimeError(f"resumed run differs: max |loss diff| {loss_diff:.3g}, max |weight diff| {w_diff:.3g}")
    return {"note": f"killed after step {killed_at} of {steps}; "
                    + ("bit-exact" if exact else f"max loss diff {loss_diff:.2g}, max weight diff {w_diff:.2g} (GPU kernels)")}


def check_torchrun(ctx):
    if not ctx.device.startswith("cuda") or torch.cuda.device_count() < 2:
        return {"status": "skip", "note": f"{torch.cuda.device_count()} GPU(s): needs 2"}
    cfg = flow_config(ctx.work, ctx.s, "torchrun", "auto", distributed={"strategy": "fsdp"})
    path = ctx.work / "torchrun.json"
    path.write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "4"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        "-m", "snapgen.train", "--no-progress", "--config", str(path)], env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise RuntimeError("torchrun failed: " + (r.stderr.strip().splitlines() or ["?"])[-1])
    times = step_times(Path(cfg["run_dir"]))
    return {"step_s": statistics.median(times[len(times) // 3:]), "note": "2 ranks, nccl, FSDP2"}


CHECKS = {"flow-bf16": check_flow, "elastic": check_elastic, "dmd": check_dmd, "kdmd": check_kdmd,
          "generate": check_generate, "bna": check_bna, "resume": check_resume, "torchrun": check_torchrun}


# --------------------------------------------------------------------------------------------- the table
class Context:
    def __init__(self, work: Path, s: dict, device: str, smoke: bool):
        self.work, self.s, self.device, self.smoke = work, s, device, smoke
        self.encoder = tiny_text_encoder(work / "text_encoder", s["text_dim"])
        self.base = self.fewstep = None


def describe(device: str) -> str:
    gpu = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if device.startswith("cuda")
           else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    return (f"{gpu}; torch {torch.__version__} (CUDA {torch.version.cuda or '-'}), Python "
            f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}")


def run_checks(names: list[str], device: str, smoke: bool, fail: str | None = None) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="snapgen_gpu_check_") as tmp:
        ctx = Context(Path(tmp), SMOKE if smoke else FULL, device, smoke)
        for name in names:
            print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
            _reset_peak(device)
            t0 = time.perf_counter()
            row = {"check": name, "status": "pass", "step_s": None, "peak_gib": None, "note": ""}
            try:
                if name == fail:
                    raise RuntimeError("failure injected by --fail (testing the harness)")
                row.update(CHECKS[name](ctx) or {})
            except Exception as e:  # one failing check must not hide the others
                row.update(status="FAIL", note=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                traceback.print_exc(file=sys.stderr)
            _sync(device) if row["status"] != "FAIL" else None
            row["peak_gib"] = _peak_gib(device) if row["status"] == "pass" else None
            row["total_s"] = time.perf_counter() - t0
            print(f"[gpu_check] {name}: {row['status']} ({row['total_s']:.1f} s) {row['note']}", file=sys.stderr,
                  flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = ["| check | status | median step (s) | peak GPU memory (GiB) | wall (s) | note |",
             "|---|---|---:|---:|---:|---|"]
    lines += [f"| {r['check']} | {r['status']} | {f(r['step_s'], '.3f')} | {f(r['peak_gib'], '.2f')} | "
              f"{r['total_s']:.1f} | {r['note'].replace('|', '/')} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (seconds): checks the check itself")
    p.add_argument("--device", help="default: cuda (cpu with --smoke)")
    p.add_argument("--only", help="comma list of checks: " + ", ".join(CHECKS))
    p.add_argument("--out", help="markdown file for the table (default benchmarks/results/gpu.md; none with --smoke)")
    p.add_argument("--fail", help=argparse.SUPPRESS)  # inject a failure into one check (the harness's own test)
    args = p.parse_args(argv)
    device = args.device or ("cpu" if args.smoke else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU visible (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              f"run with --smoke to check the harness on the CPU", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.only.split(",")] if args.only else list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        print(f"gpu_check: unknown check(s) {unknown}; known: {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.perf_counter()
    rows = run_checks(names, device, args.smoke, args.fail)
    text = (f"# snapgen GPU check\n\n{describe(device)}; {'smoke sizes' if args.smoke else 'full sizes'}; "
            f"{time.perf_counter() - t0:.0f} s in all. Command: `bash scripts/gpu_check.sh`\n\n{table(rows)}\n")
    print(text)
    out = args.out or (None if args.smoke else str(ROOT / "benchmarks" / "results" / "gpu.md"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        print(f"written to {out}")
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
