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
    # eager k-means rows are labelled for what they compute: fp32 (weights dequantized at load), with a note
    assert ("| tiny | eager | k-means 4.3 bit (fp32 compute) | 1 | 4 | 0.1 | 200 | 2.0 | 4.0x smaller | 3.0 | "
            "0.390 | -2.5% |") in table
    assert "| tiny | onnx | quant |" in table and "| small | eager | int8 |" in table
    assert table.splitlines()[-1].startswith("Eager k-means rows: the weights are stored as k-means clusters")
    assert "fp32's; their gain is the file size" in table
    assert "Eager k-means" not in format_report({"rows": [r for r in rows if r["precision"] != "quant"]})


def test_evaluated_rows_get_a_paired_difference_with_its_interval(tmp_path):
    """With both rows' result files on the same cells, "vs fp32" is the paired comparison (`snapgen eval --compare
    fp32 quant`): the difference in correct images, its bootstrap interval, wins / losses and McNemar's p."""
    from snapgen.eval.run import LEVEL, N_BOOT
    from snapgen.eval.stats import compare_rows
    from snapgen.export.device_report import compare_to_fp32, format_report

    def results(name, flip):  # 30 prompts x 2 seeds; quant loses the images in ``flip``
        rows = [{"tag": "single_object", "prompt": f"p{i}", "prompt_index": i, "seed": k, "correct": (i % 2 == 0) and (i, k) not in flip}
                for i in range(30) for k in range(2)]
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        return rows

    a, b = results("fp32", set()), results("quant", {(0, 0), (2, 1), (4, 0), (6, 0)})
    base = {"variant": "tiny", "backend": "eager", "step_ms": 1, "steps": 4, "end_to_end_s": 0.1, "peak_rss_mib": 200,
            "dit_mb": 4.0, "total_mb": 5, "alignment": 0.3, "fd": 1}
    rows = [{**base, "precision": "fp32", "dit_mb": 8.0, "sceneeval": 0.5, "eval_dir": str(tmp_path / "fp32"),
             "sceneeval_interval": {"value": 0.5, "lo": 0.41, "hi": 0.59}},
            {**base, "precision": "quant", "sceneeval": 26 / 60, "eval_dir": str(tmp_path / "quant")}]
    c = compare_to_fp32(rows)[1]["sceneeval_vs_fp32"]
    ref = compare_rows(a, b, n_boot=N_BOOT, level=LEVEL)["overall"]
    assert (c["wins"], c["losses"]) == (0, 4) and c["diff"] == pytest.approx(-4 / 60, abs=1e-4)
    assert c["lo"] == pytest.approx(ref["lo"], abs=1e-4) and c["hi"] == pytest.approx(ref["hi"], abs=1e-4)
    assert c["p"] == pytest.approx(0.125)  # exact McNemar: 4 discordant images, all one way: 2 * 0.5**4
    table = format_report({"rows": rows})
    assert "| 0.500 [0.41, 0.59] | - |" in table
    assert f"| 0.433 | -0.067 [{c['lo']:+.3f}, {c['hi']:+.3f}] p 0.12 |" in table
    (tmp_path / "quant" / "results.jsonl").unlink()  # a report gone: the relative change, and why, not a crash
    r = compare_to_fp32(rows)[1]
    assert r["sceneeval_vs_fp32"] is None and "results.jsonl" in r["sceneeval_vs_fp32_error"]
    assert "| 0.433 | -13.3% |" in format_report({"rows": rows})


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
