"""`snapgen info`: the JSON it prints, its counted FLOPs, and its errors."""

import json

import torch

from snapgen.cli import main
from snapgen.models import PRESETS, ThreeStageDiT
from snapgen.models.summary import count_flops


def run_json(capsys, *argv):
    assert main(["info", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_json_fields(capsys):
    s = run_json(capsys, "--preset", "small", "--resolution", "1024")
    assert isinstance(s["params"], int) and abs(s["params"] / 0.4e9 - 1) <= 0.15
    assert s["latent_shape"] == [16, 128, 128]
    assert [(st["name"], st["tokens"], st["attention"]) for st in s["stages"]] == [
        ("down", 4096, "assa"), ("middle", 1024, "dense"), ("up", 4096, "assa")]
    assert [st["blocks"] for st in s["stages"]] == list(PRESETS["small"].depths)
    assert s["flops_per_forward"] > 1e12


def test_info_non_square_and_text_len(capsys):
    s = run_json(capsys, "--preset", "tiny", "--resolution", "512x768", "--text-len", "7")
    assert s["latent_shape"] == [16, 64, 96] and s["stages"][0]["grid"] == [32, 48] and s["text_tokens"] == 7


def test_meta_flop_count_matches_a_real_forward():
    """Counting on the meta device must give what a real forward pass executes."""
    cfg = PRESETS["nano"]
    with torch.device("meta"):
        meta = ThreeStageDiT(cfg)
    real = ThreeStageDiT(cfg)
    assert count_flops(meta, (4, 16, 24), 5, cfg.text_dim) == count_flops(real, (4, 16, 24), 5, cfg.text_dim)


def test_flops_scale_like_the_architecture():
    """Doubling the side quadruples the tokens: linear FLOPs x4, attention more -- so between 4x and 16x;
    and ASSA must cost less than dense attention in the outer stages."""
    cfg = PRESETS["micro"]
    with torch.device("meta"):
        m = ThreeStageDiT(cfg)
        dense = ThreeStageDiT(cfg.replace(outer_attention="dense"))
    f1 = count_flops(m, (4, 32, 32), 8, cfg.text_dim)
    f2 = count_flops(m, (4, 64, 64), 8, cfg.text_dim)
    assert 4 < f2 / f1 < 16
    assert count_flops(dense, (4, 64, 64), 8, cfg.text_dim) > f2


def test_info_bad_resolution_is_a_clear_error(capsys):
    assert main(["info", "--preset", "small", "--resolution", "1000"]) == 2
    err = capsys.readouterr().err
    assert "not supported" in err and "992" in err and "1024" in err
    assert main(["info", "--resolution", "big"]) == 2
    assert "1024 or 768x1344" in capsys.readouterr().err


def test_info_forward_runs_the_model(capsys):
    s = run_json(capsys, "--preset", "nano", "--resolution", "128", "--forward")
    assert s["forward"]["output_shape"] == [1, 4, 16, 16] and s["forward"]["max_abs"] == 0.0
