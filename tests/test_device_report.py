"""snapgen bench device on a tiny elastic pipeline: every row measured, quantized artifacts smaller."""

import json

import pytest

from snapgen.cli import main

pytest.importorskip("onnxruntime")


@pytest.mark.export
def test_bench_device_eager_rows(elastic_folder, tmp_path, capsys):
    """Fast twin of the test below (eager backend only, fp32 and torchao int8; k-means quantization has its own
    tests): the CLI, the rows, the files."""
    assert main(["bench", "device", "--model", str(elastic_folder), "--variants", "tiny", "--backends", "eager",
                 "--precisions", "fp32", "int8", "--repeats", "1", "--work", str(tmp_path / "work"),
                 "--out", str(tmp_path / "res"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {(r["backend"], r["precision"]): r for r in report["rows"]}
    assert set(rows) == {("eager", "fp32"), ("eager", "int8")}
    for r in rows.values():
        assert r["step_ms"] > 0 and r["end_to_end_s"] > 0 and r["peak_rss_mib"] > 100 and r["steps"] == 3
    assert "| tiny | eager | int8 |" in (tmp_path / "res" / "device.md").read_text()


@pytest.mark.export
@pytest.mark.slow  # ~90 s on 2 cores (ONNX exports and int8); the eager twin above runs in CI
def test_bench_device_rows(elastic_folder, tmp_path, capsys):
    assert main(["bench", "device", "--model", str(elastic_folder), "--variants", "tiny", "--backends", "eager",
                 "onnx", "--repeats", "2", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "res"),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {(r["backend"], r["precision"]): r for r in report["rows"]}
    assert set(rows) == {("eager", "fp32"), ("eager", "quant"), ("eager", "int8"), ("onnx", "fp32"), ("onnx", "quant")}
    for r in rows.values():
        assert r["step_ms"] > 0 and r["end_to_end_s"] > 0 and r["peak_rss_mib"] > 100 and r["steps"] == 3
    # tiny test model: many of its tensors are too small to cluster (kept fp16); the shipped model gets 7x
    assert rows[("eager", "quant")]["dit_mb"] < 0.75 * rows[("eager", "fp32")]["dit_mb"]
    assert rows[("onnx", "quant")]["dit_mb"] < 0.75 * rows[("onnx", "fp32")]["dit_mb"]
    assert "| tiny | onnx | quant |" in (tmp_path / "res" / "device.md").read_text()


def test_quantized_rows_are_compared_to_their_own_fp32_row():
    from snapgen.export.device_report import compare_to_fp32, format_report

    def row(v, b, p, mb, se):
        return {"variant": v, "backend": b, "precision": p, "step_ms": 1, "steps": 4, "end_to_end_s": 0.1,
                "peak_rss_mib": 200, "dit_mb": mb, "total_mb": mb + 1, "sceneeval": se, "alignment": 0.3, "fd": 1}

    rows = [row("tiny", "eager", "fp32", 8.0, 0.40), row("tiny", "eager", "quant", 2.0, 0.39),
            row("tiny", "onnx", "fp32", 10.0, 0.40), row("tiny", "onnx", "quant", 4.0, 0.42),
            row("small", "eager", "fp32", 12.0, 0.5), row("small", "eager", "int8", 4.0, 0.5)]
    cmp = {(r["variant"], r["backend"], r["precision"]): r for r in compare_to_fp32(rows)}
    assert cmp[("tiny", "eager", "quant")]["smaller"] == 4.0
    assert cmp[("tiny", "eager", "quant")]["sceneeval_change"] == pytest.approx(-0.025)
    assert cmp[("tiny", "onnx", "quant")]["smaller"] == 2.5  # against onnx fp32, not eager fp32
    assert cmp[("tiny", "onnx", "quant")]["sceneeval_change"] == pytest.approx(0.05)
    assert cmp[("small", "eager", "int8")]["smaller"] == 3.0
    assert "smaller" not in cmp[("tiny", "eager", "fp32")]
    table = format_report({"rows": rows})
    assert "| tiny | eager | quant | 1 | 4 | 0.1 | 200 | 2.0 | 4.0x smaller | 3.0 | 0.39 | -2.5% |" in table


def test_cached_artifacts_are_reused_only_for_the_same_model_files(elastic_folder, tmp_path):
    import os
    import shutil

    from snapgen.export.device_report import prepare_artifact

    model = tmp_path / "model"
    shutil.copytree(elastic_folder, model)
    quiet = lambda *_: None  # noqa: E731
    out = prepare_artifact(model, "tiny", "eager", "fp32", tmp_path / "work", progress=quiet)
    weights = out / "transformer" / "model.safetensors"
    first = weights.stat().st_mtime_ns
    assert prepare_artifact(model, "tiny", "eager", "fp32", tmp_path / "work", progress=quiet) == out
    assert weights.stat().st_mtime_ns == first  # reused, not exported again
    st = (model / "pipeline.json").stat()
    os.utime(model / "pipeline.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the model was re-shipped
    prepare_artifact(model, "tiny", "eager", "fp32", tmp_path / "work", progress=quiet)
    assert weights.stat().st_mtime_ns != first


def test_worker_peak_memory_is_its_own_not_the_parents():
    import subprocess
    import sys

    import torch

    from snapgen.export.device_report import peak_rss_mib

    big = torch.ones(256 * 2**20)  # 1 GiB touched in this (parent) process
    parent = peak_rss_mib()
    assert parent > 1024 and big[-1] == 1
    out = subprocess.run([sys.executable, "-c", "from snapgen.export.device_report import peak_rss_mib; "
                          "print(peak_rss_mib())"], capture_output=True, text=True, check=True).stdout
    child = float(out.strip().splitlines()[-1])
    # ru_maxrss survives exec on Linux: a worker would have reported >= the parent's peak
    assert 50 < child < parent - 700
