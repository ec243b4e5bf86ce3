"""Elastic sub-networks through the pipeline and the CLI: --variant, snapgen extract, snapgen select."""

import json

import numpy as np
import pytest
from helpers.builders import build_elastic_pipeline
from helpers.fakes import FakeEncoder

from snapgen.cli import main
from snapgen.elastic.select import select_variant
from snapgen.pipelines import TextToImagePipeline


def arr(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def test_pipeline_variants_generate_different_images_and_load_by_name(tmp_path):
    pipe = build_elastic_pipeline(text_encoder=FakeEncoder())
    assert pipe.variants == ["tiny", "small", "full"]
    prompts = ["a red circle", "two blue stars"]
    by_variant = {v: arr(pipe.set_variant(v)(prompts, seed=3)) for v in pipe.variants}
    assert pipe.variant == "full"
    assert np.abs(by_variant["tiny"] - by_variant["full"]).max() > 10
    pipe.save_pretrained(tmp_path)
    again = TextToImagePipeline.from_pretrained(tmp_path, text_encoder=FakeEncoder(), variant="small")
    assert again.variant == "small"
    assert np.array_equal(arr(again(prompts, seed=3)), by_variant["small"])


def test_extracted_pipeline_generates_what_the_supernet_generates(tmp_path):
    pipe = build_elastic_pipeline(text_encoder=FakeEncoder())
    prompts = ["a green heart above a yellow square"]
    for v in ("tiny", "small"):
        sub = pipe.extract(v)
        assert sub.variants == ["full"]
        assert sub.transformer.config.width == int(128 * pipe.transformer.variants[v])
        # fp32 extraction is exact to ~1e-6 in the velocity; images may differ by one rounding step
        assert np.abs(arr(sub(prompts, seed=1)) - arr(pipe.set_variant(v)(prompts, seed=1))).max() <= 1
    pipe.set_variant("full")


def test_cli_generate_and_extract_with_variants(elastic_folder, tmp_path, capsys):
    assert main(["generate", "a red circle", "--model", str(elastic_folder), "--variant", "tiny", "--steps",
                 "2", "--out", str(tmp_path / "tiny.png"), "--no-progress"]) == 0
    assert "with the tiny variant" in capsys.readouterr().out
    assert main(["generate", "a red circle", "--model", str(elastic_folder), "--variant", "huge",
                 "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "unknown variant 'huge'" in err and "tiny" in err
    out = tmp_path / "small"
    assert main(["extract", "--model", str(elastic_folder), "--variant", "small", "--out", str(out)]) == 0
    assert "extracted 'small'" in capsys.readouterr().out
    cfg = json.loads((out / "transformer" / "config.json").read_text())
    assert cfg["width"] == 64 and cfg["elastic_variants"] == []
    # generate from the extracted folder == generate --variant small from the supernet folder
    assert main(["generate", "a blue star", "--model", str(out), "--steps", "2", "--out",
                 str(tmp_path / "a.png"), "--no-progress"]) == 0
    assert main(["generate", "a blue star", "--model", str(elastic_folder), "--variant", "small", "--steps",
                 "2", "--out", str(tmp_path / "b.png"), "--no-progress"]) == 0
    from PIL import Image

    a, b = (np.asarray(Image.open(tmp_path / n), dtype=np.int16) for n in ("a.png", "b.png"))
    assert np.abs(a - b).max() <= 1
    # refuses to overwrite, and names the fix
    assert main(["extract", "--model", str(elastic_folder), "--variant", "small", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


def test_cli_generate_all_variants_grid(elastic_folder, tmp_path, capsys):
    from PIL import Image

    prompts = ["a red circle", "two blue stars"]
    assert main(["generate", *prompts, "--model", str(elastic_folder), "--variant", "all", "--steps", "2",
                 "--grid", "--out", str(tmp_path / "all"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "per variant: tiny" in out and "tiny/small/full" in out
    files = sorted(p.name for p in (tmp_path / "all").glob("0*.png"))
    assert len(files) == 6 and files[0].startswith("00_tiny") and files[2].startswith("02_full")
    grid = Image.open(tmp_path / "all" / "grid.png")
    single = Image.open(tmp_path / "all" / files[0])
    assert grid.size[0] == 3 * max(single.size[0], 96)  # columns = variants, rows = prompts
    # each cell is what --variant NAME alone generates for the same prompts and seed
    for name, f in (("small", files[4]), ("tiny", files[3])):
        assert main(["generate", *prompts, "--model", str(elastic_folder), "--variant", name, "--steps", "2",
                     "--out", str(tmp_path / name), "--no-progress"]) == 0
        alone = sorted((tmp_path / name).glob("01_*.png"))[0]
        a, b = (np.asarray(Image.open(x), dtype=np.int16) for x in (alone, tmp_path / "all" / f))
        assert np.array_equal(a, b)
    assert main(["generate", "pizza", "--model", str(elastic_folder), "--variant", "tiny,huge", "--out",
                 str(tmp_path / "x")]) == 2
    assert "not ['huge']" in capsys.readouterr().err


def test_cli_select_picks_the_widest_variant_within_budget(elastic_folder, capsys):
    assert main(["select", "--model", str(elastic_folder), "--budget-ms", "100000", "--resolution", "16",
                 "--repeats", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["selected"] == "full" and set(res["variants"]) == {"tiny", "small", "full"}
    params = [res["variants"][v]["params"] for v in ("tiny", "small", "full")]
    assert params[0] < params[1] < params[2]
    assert main(["select", "--model", str(elastic_folder), "--budget-ms", "0.0001", "--resolution", "16",
                 "--repeats", "2", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["selected"] is None
    assert main(["select", "--model", str(elastic_folder), "--budget-ms", "5", "--resolution", "15"]) == 2
    assert "multiple" in capsys.readouterr().err


def test_select_variant_rule():
    ratios = {"tiny": 0.375, "small": 0.5, "full": 1.0}
    assert select_variant({"tiny": 5, "small": 9, "full": 30}, ratios, 10) == "small"
    assert select_variant({"tiny": 5, "small": 9, "full": 30}, ratios, 30) == "full"
    assert select_variant({"tiny": 5, "small": 9, "full": 30}, ratios, 4.9) is None
    # a noisy measurement where small came out slower than full still picks the widest that fits
    assert select_variant({"tiny": 5, "small": 40, "full": 30}, ratios, 35) == "full"
    with pytest.raises(ValueError):
        select_variant({"tiny": 1}, ratios, 0)
