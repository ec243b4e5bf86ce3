"""``snapgen bench device``: for each variant x backend x precision, the numbers a deployment needs.

Backends: ``eager`` (PyTorch), ``onnx`` (onnxruntime), ``executorch`` (XNNPACK, ExecuTorch's runtime).
Precisions: ``fp32``; ``quant`` -- the paper's k-means weights (~4.3 bits) for eager (stored clustered,
dequantized at load, so its speed is fp32's and its gain is the file), onnxruntime's dynamic int8 quantization
of the DiT graph for ONNX (a baseline); ``int8`` -- torchao's int8 weight-only on the eager model (a baseline,
applied at load). ExecuTorch runs fp32 only here.

Per configuration, each in a fresh process (so peak memory is its own): per-step latency (one DiT call with
the pipeline's batch: 1 without CFG, 2 with), end-to-end time for one image (text encoding + all steps +
decoding), peak RSS, file size of the DiT weights and of everything; optionally SceneEval / alignment / FD.
Exports are cached under ``--work`` so a second run only measures.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from types import SimpleNamespace

import torch

from ..models.multiscale import denoiser_input_shapes

__all__ = ["prepare_artifact", "measure", "device_report", "compare_to_fp32", "format_report", "PAPER_MS"]

# SnapGen++ supplementary Table 1, iPhone 16 Pro Max, 1024px (per step / 4-step end to end)
PAPER_MS = {"tiny": (280, 1200), "small": (360, 1800)}


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _fingerprint(model_dir: Path) -> str:
    """Names, sizes and modification times of the model's files: a re-trained or re-shipped model is exported
    again instead of reusing a stale artifact from ``--work``."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(model_dir)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def prepare_artifact(model_dir, variant: str, backend: str, precision: str, work: Path, resolution=None,
                     progress=print) -> Path:
    """Export / quantize once into ``work``; returns the artifact folder."""
    from ..pipelines import TextToImagePipeline

    out = work / f"{variant}_{backend}_{precision}"
    stamp = json.dumps({"model": str(Path(model_dir).resolve()), "fingerprint": _fingerprint(Path(model_dir)),
                        "resolution": list(resolution) if resolution else None})
    if (out / ".done").is_file() and (out / ".done").read_text() == stamp:
        return out  # exported earlier from these exact model files
    if out.exists():  # another model's (or an unfinished) export
        shutil.rmtree(out)
    pipe = TextToImagePipeline.from_pretrained(model_dir, variant=variant)
    progress(f"preparing {out.name} ...")
    if backend == "eager" and precision in ("fp32", "int8"):
        pipe.extract(variant).save_pretrained(out)
        if precision == "int8":  # torchao int8 weight-only, applied at load (a baseline; no compact file)
            (out / "torchao_int8").write_text("quantize_(transformer, Int8WeightOnlyConfig()) at load\n")
    elif backend == "eager" and precision == "quant":
        from ..eval.sceneeval import load_prompts, prompt_path
        from .quantize import quantize_pipeline

        prompts = [p["prompt"] for p in load_prompts(prompt_path("sceneeval"))][::4][:16]
        quantize_pipeline(pipe, out, prompts, progress=progress)
    elif backend == "onnx":
        from .onnx import export_onnx

        export_onnx(pipe, out, resolution=resolution, progress=False)
        if precision == "quant":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            import onnx

            fp32 = out / "dit.fp32.onnx"
            model = onnx.load(str(out / "dit.onnx"))
            del model.graph.value_info[:]  # the exporter's shape annotations trip ORT's re-inference; recomputed
            onnx.save(model, str(fp32))
            (out / "dit.onnx").unlink()
            quantize_dynamic(str(fp32), str(out / "dit.onnx"), weight_type=QuantType.QInt8)
            fp32.unlink()
            meta = json.loads((out / "export.json").read_text())
            meta["files"]["dit.onnx"] = (out / "dit.onnx").stat().st_size
            meta["quantization"] = "onnxruntime dynamic int8 (weights), DiT only"
            (out / "export.json").write_text(json.dumps(meta, indent=2) + "\n")
    elif backend == "executorch":
        if precision != "fp32":
            raise ValueError("executorch runs fp32 here")
        from .mobile import export_executorch

        export_executorch(pipe, out, resolution=resolution, progress=False)
    else:
        raise ValueError(f"unknown backend {backend!r}")
    (out / ".done").write_text(stamp)
    return out


def _load(folder: Path, backend: str):
    if backend == "eager":
        from ..pipelines import TextToImagePipeline

        pipe = TextToImagePipeline.from_pretrained(folder)
        if (folder / "torchao_int8").is_file():
            from ..utils.quiet import quiet_imports

            try:
                with quiet_imports():
                    from torchao.quantization import Int8WeightOnlyConfig, quantize_
            except ImportError:
                raise ImportError("the int8 baseline needs torchao: pip install 'snapgen[device]'") from None
            quantize_(pipe.transformer, Int8WeightOnlyConfig())
        return pipe
    if backend == "onnx":
        from .onnx import OnnxPipeline

        return OnnxPipeline(folder)
    from .mobile import ExecuTorchPipeline

    return ExecuTorchPipeline(folder)


def peak_rss_mib() -> float:
    """This process's peak resident memory. Linux: ``VmHWM`` of /proc/self/status, which belongs to the
    process's own address space. Not ``ru_maxrss``: Linux carries it over ``exec``, so a worker started by a
    large parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB elsewhere


@torch.no_grad()
def measure(folder: Path, backend: str, repeats: int = 7) -> dict:
    """Run in a fresh process: latency per step and end to end, peak RSS."""
    pipe = _load(folder, backend)
    prompt = "a red circle to the left of a blue square"
    pipe([prompt], seed=0)  # warm-up (and the first generation's allocations)
    if backend == "eager":
        m = pipe.transformer.eval()
        s = pipe.sampling_settings()
        B = 2 if s["guidance"] != 1.0 else 1
        H, W = pipe.config.resolution
        f = pipe.vae_factor
        x_shape, t_shape = denoiser_input_shapes(m.config, B, (m.config.in_channels, H // f, W // f))  # DFM: packed
        x, t = torch.randn(x_shape), torch.full(t_shape, 0.5)
        (text, mask), _ = pipe.encode_prompts([prompt] * B)
        step = lambda: m(x, t, {"text": text, "text_mask": mask})  # noqa: E731
        steps = s["steps"]
    else:
        meta = pipe.meta
        B = meta["batch"]
        x_shape, t_shape = denoiser_input_shapes(SimpleNamespace(dfm_levels=int(meta.get("dfm_levels", 1))), B,
                                                 tuple(meta["latent"]))
        x, t = torch.randn(x_shape), torch.full(t_shape, 0.5)
        tokens, mask = pipe.encode(prompt)
        tokens, mask = torch.cat([tokens] * B), torch.cat([mask] * B)
        step = lambda: pipe._run("dit", {"x": x, "t": t, "text": tokens.float(), "text_mask": mask})  # noqa: E731
        steps = meta["steps"]
    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    e2e = []
    for i in range(3):
        t0 = time.perf_counter()
        pipe([prompt], seed=i)
        e2e.append(time.perf_counter() - t0)
    dit_file = next((p for p in [folder / "transformer", folder / "dit.onnx", folder / "dit.pte"] if p.exists()))
    return {"step_ms": round(statistics.median(times), 2), "steps": steps,
            "end_to_end_s": round(statistics.median(e2e), 3),
            "peak_rss_mib": round(peak_rss_mib(), 1),
            "dit_mb": round(_size(dit_file) / 1e6, 2), "total_mb": round(_size(folder) / 1e6, 2),
            "threads": torch.get_num_threads()}


def _evaluate(folder: Path, backend: str, evaluate: str, out_dir: Path, progress) -> dict:
    """SceneEval / alignment / FD of one artifact; reused while the artifact (its ``.done`` stamp) and the
    evaluation mode are the same, so re-measuring latency does not redo the evaluations."""
    from ..eval.run import run_evaluation

    from ..eval.run import resolve_prompts_path

    # the prompt set and the result format are part of the key: a report of another set is never reused
    # (format 3: per-image noise in snapgen eval; a format-2 report scored other images, drawn with batch noise)
    key = json.dumps({"artifact": (folder / ".done").read_text(), "eval": evaluate,
                      "prompts": str(resolve_prompts_path(None)), "format": 3})
    if (out_dir / "artifact.json").is_file() and (out_dir / "artifact.json").read_text() == key \
            and (out_dir / "summary.json").is_file():
        progress(f"{folder.name}: reusing the evaluation in {out_dir}")
        return json.loads((out_dir / "summary.json").read_text())
    s = run_evaluation(pipe=_load(folder, backend), quick=evaluate == "quick", progress=False, out_dir=out_dir)
    (out_dir / "artifact.json").write_text(key)
    return s


def device_report(model_dir=None, variants=None, backends=("eager", "onnx", "executorch"),
                  precisions=("fp32", "quant", "int8"), work="runs/device_bench", resolution=None, evaluate: str = "none",
                  repeats: int = 7, progress=print) -> dict:
    from ..pipelines import TextToImagePipeline, default_model_dir

    model_dir = Path(model_dir) if model_dir else default_model_dir()
    pipe = TextToImagePipeline.from_pretrained(model_dir)
    variants = list(variants or pipe.variants)
    work = Path(work)
    rows = []
    for v in variants:
        for b in backends:
            for prec in precisions:
                if (b == "executorch" and prec != "fp32") or (b != "eager" and prec == "int8"):
                    continue
                folder = prepare_artifact(model_dir, v, b, prec, work, resolution, progress)
                cmd = [sys.executable, "-m", "snapgen.export.device_report", "--worker",
                       json.dumps({"folder": str(folder), "backend": b, "repeats": repeats})]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"measuring {folder.name} failed:\n{proc.stderr[-2000:]}")
                r = {"variant": v, "backend": b, "precision": prec,
                     **json.loads(proc.stdout.strip().splitlines()[-1])}
                if evaluate != "none":
                    s = _evaluate(folder, b, evaluate, work / "eval" / folder.name, progress)
                    r.update(sceneeval=s["sceneeval"]["overall"], alignment=s["alignment"], fd=s["fd"],
                             sceneeval_interval=(s.get("intervals") or {}).get("overall"),
                             eval_dir=str(work / "eval" / folder.name))
                progress(json.dumps(r))
                rows.append(r)
    return {"model": str(model_dir), "rows": compare_to_fp32(rows), "paper_iphone_ms": PAPER_MS,
            "note": "per-step = one DiT call (batch 2 with CFG, 1 without); end-to-end = one image incl. text "
                    "encoding and decoding; quant = k-means ~4.3 bits (eager) / onnxruntime dynamic int8 (onnx)"}


def compare_to_fp32(rows: list[dict]) -> list[dict]:
    """Each quantized row against the fp32 row of the same variant and backend (int8 eager: eager fp32):
    ``smaller`` = fp32 DiT file / this DiT file, ``sceneeval_change`` = relative SceneEval change, and, when both
    rows were evaluated (``eval_dir``: same prompts and seeds), ``sceneeval_vs_fp32`` = the paired comparison of
    :func:`snapgen.eval.stats.compare_rows` (difference with its 95% interval, wins / losses, McNemar p)."""
    fp32 = {(r["variant"], r["backend"]): r for r in rows if r["precision"] == "fp32"}
    out = []
    for r in rows:
        ref = fp32.get((r["variant"], r["backend"]))
        r = dict(r)
        if ref is not None and r["precision"] != "fp32":
            r["smaller"] = round(ref["dit_mb"] / r["dit_mb"], 2)
            if ref.get("sceneeval") and "sceneeval" in r:
                r["sceneeval_change"] = round((r["sceneeval"] - ref["sceneeval"]) / ref["sceneeval"], 4)
            if ref.get("eval_dir") and r.get("eval_dir") and "sceneeval_vs_fp32" not in r:
                try:
                    r["sceneeval_vs_fp32"] = _paired(ref["eval_dir"], r["eval_dir"])
                except (ValueError, FileNotFoundError) as e:  # a report gone or from before the paired format
                    r["sceneeval_vs_fp32"] = None
                    r["sceneeval_vs_fp32_error"] = str(e)
        out.append(r)
    return out


def _paired(ref_dir: str, row_dir: str) -> dict:
    """``row - ref`` overall SceneEval on the same cells (``snapgen eval --compare ref row``)."""
    from ..eval.run import LEVEL, N_BOOT, load_run
    from ..eval.stats import compare_rows

    o = compare_rows(load_run(ref_dir)[1], load_run(row_dir)[1], n_boot=N_BOOT, level=LEVEL)["overall"]
    return {k: (round(o[k], 4) if k in ("diff", "lo", "hi") else o[k]) for k in ("diff", "lo", "hi", "wins",
                                                                                 "losses", "p")}


def _vs_fp32_cell(r: dict) -> str:
    c = r.get("sceneeval_vs_fp32")
    if c:
        return f"{c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}] p {c['p']:.2g}"
    return f"{100 * r['sceneeval_change']:+.1f}%" if "sceneeval_change" in r else "-"


# eager k-means rows: weights stored clustered, dequantized to fp32 at load -> fp32's compute, a smaller file
EAGER_KMEANS_LABEL = "k-means 4.3 bit (fp32 compute)"
EAGER_KMEANS_NOTE = ("Eager k-means rows: the weights are stored as k-means clusters (~4.3 bits) and dequantized "
                     "to fp32 at load, so their compute, step time and memory are fp32's; their gain is the file "
                     "size (DiT MB).")


def _precision_cell(r: dict) -> str:
    return EAGER_KMEANS_LABEL if (r["backend"], r["precision"]) == ("eager", "quant") else r["precision"]


def format_report(report: dict) -> str:
    """The markdown table (one row per variant x backend x precision); a note line under it when eager k-means
    rows are present (their speed is fp32's)."""
    from ..eval.report import with_interval

    rows = compare_to_fp32(report["rows"])
    has_eval = any("sceneeval" in r for r in rows)
    head = ["variant", "backend", "precision", "step ms", "steps", "image s", "peak MiB", "DiT MB", "vs fp32",
            "total MB"]
    if has_eval:
        head += ["SceneEval [95% CI]", "vs fp32 (paired)", "alignment", "FD"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], r["backend"], _precision_cell(r), r["step_ms"], r["steps"], r["end_to_end_s"],
                 r["peak_rss_mib"], r["dit_mb"], f"{r['smaller']}x smaller" if "smaller" in r else "-", r["total_mb"]]
        if has_eval:
            se = with_interval(r["sceneeval"], r.get("sceneeval_interval")) if "sceneeval" in r else "-"
            cells += [se, _vs_fp32_cell(r), r.get("alignment", "-"), r.get("fd", "-")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if any((r["backend"], r["precision"]) == ("eager", "quant") for r in rows):
        lines += ["", EAGER_KMEANS_NOTE]
    return "\n".join(lines)

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        spec = json.loads(sys.argv[2])
        print(json.dumps(measure(Path(spec["folder"]), spec["backend"], spec["repeats"])))
