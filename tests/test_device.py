"""--device / --dtype: names resolved once with clear errors (snapgen.utils.device), and generate / eval
running the pipeline where and in the precision asked."""

import numpy as np
import pytest
import torch

from snapgen.cli import main
from snapgen.utils.device import resolve_device, resolve_dtype


def test_resolve_device_names_and_missing_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="sees no CUDA GPU.*--device cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"has 2 CUDA GPU\(s\) \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")


def test_resolve_dtype():
    assert resolve_dtype(None) is torch.float32
    assert resolve_dtype("bf16") is resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("FP16") is torch.float16
    assert resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        resolve_dtype(torch.int64)


def test_generate_on_a_missing_gpu_is_one_line_and_writes_nothing(elastic_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--model", str(elastic_folder), "--device", "cuda",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device cpu" in err and "Traceback" not in err
    assert not out.exists()
    assert main(["generate", "a red circle", "--backend", "onnx", "--model", str(tmp_path), "--dtype", "fp16",
                 "--out", str(out)]) == 2
    assert "--dtype cannot change an exported model" in capsys.readouterr().err


def test_generate_in_bf16_is_close_to_fp32_and_not_equal(elastic_folder, tmp_path, capsys):
    args = ["generate", "a red circle", "--model", str(elastic_folder), "--steps", "2", "--no-progress",
            "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "fp32.png")]) == 0
    assert main([*args, "--dtype", "bf16", "--out", str(tmp_path / "bf16.png")]) == 0
    assert "note: --dtype bf16 on the CPU is slow" in capsys.readouterr().out
    from PIL import Image

    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("fp32", "bf16"))
    diff = np.abs(a - b)
    assert diff.max() > 0, "bf16 gave the fp32 image bit for bit: the pipeline was not cast"
    assert diff.mean() < 6, f"bf16 image too far from fp32 (mean |diff| {diff.mean():.1f} grey levels)"
