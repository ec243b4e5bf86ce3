"""snapgen bench device on a tiny elastic pipeline: every row measured, quantized artifacts smaller."""

import json

import pytest
from test_export_onnx import folder  # noqa: F401  (the tiny elastic pipeline with a tiny BERT)

from snapgen.cli import main

pytest.importorskip("onnxruntime")


def test_bench_device_rows(folder, tmp_path, capsys):  # noqa: F811
    assert main(["bench", "device", "--model", str(folder), "--variants", "tiny", "--backends", "eager", "onnx",
                 "--repeats", "2", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "res"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {(r["backend"], r["precision"]): r for r in report["rows"]}
    assert set(rows) == {("eager", "fp32"), ("eager", "quant"), ("eager", "int8"), ("onnx", "fp32"), ("onnx", "quant")}
    for r in rows.values():
        assert r["step_ms"] > 0 and r["end_to_end_s"] > 0 and r["peak_rss_mib"] > 100 and r["steps"] == 3
    # tiny test model: many of its tensors are too small to cluster (kept fp16); the shipped model gets 7x
    assert rows[("eager", "quant")]["dit_mb"] < 0.75 * rows[("eager", "fp32")]["dit_mb"]
    assert rows[("onnx", "quant")]["dit_mb"] < 0.75 * rows[("onnx", "fp32")]["dit_mb"]
    assert "| tiny | onnx | quant |" in (tmp_path / "res" / "device.md").read_text()
