"""`snapgen eval` end to end on the shipped model (quick mode)."""

import json

from snapgen.cli import main

CATEGORIES = ["single_object", "two_object", "counting", "colors", "position", "color_attr", "overall"]


def test_eval_quick_json_and_report(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["eval", "--quick", "--json", "--out", str(out), "--no-progress", "--steps", "4",
                 "--device", "cpu", "--dtype", "fp32"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["device"] == "cpu" and summary["dtype"] == "float32"
    assert set(CATEGORIES) <= set(summary["sceneeval"])
    scores = [summary["sceneeval"][c] for c in CATEGORIES[:-1]]
    assert all(0.0 <= v <= 1.0 for v in scores)
    assert abs(summary["sceneeval"]["overall"] - sum(scores) / len(scores)) < 1e-3
    assert {"alignment", "fd", "steps", "cfg", "images", "seconds"} <= set(summary)
    assert summary["steps"] == 4 and summary["images"] == 18
    assert summary["model"].endswith("snapgen-micro") and summary["image_encoder"].endswith("image-encoder")
    report = (out / "report.md").read_text()
    assert report.startswith("# snapgen eval")
    rows = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 18 and all({"correct", "prompt_index", "seed", "alignment"} <= set(r) for r in rows)
    # the default set is the headline set; --quick keeps the first 3 prompts of each category, in file order
    assert summary["prompt_set"].endswith("headline.jsonl")
    from snapgen.eval.sceneeval import load_prompts, prompt_path

    tags = [p["tag"] for p in load_prompts(prompt_path("headline"))]
    first = [i for i, t in enumerate(tags) if tags.index(t) <= i < tags.index(t) + 3]
    assert {r["seed"] for r in rows} == {0} and sorted(r["prompt_index"] for r in rows) == sorted(first)
    for c in CATEGORIES:  # every score has its interval, and the report prints it
        ci = summary["intervals"][c]
        assert ci["lo"] <= summary["sceneeval"][c] == ci["value"] <= ci["hi"]
        assert f"{ci['value']:.3f} [{ci['lo']:.2f}, {ci['hi']:.2f}]" in report
    a = summary["alignment_interval"]
    assert a["lo"] <= summary["alignment"] <= a["hi"] and summary["fd_interval"] is None
    assert "no per-image interval" in report and summary["detector_card"]["thresholds"]["counting"] == 0.9
    assert "false objects per image, held-out negatives" in report and "objects per pure-noise image" in report


def test_eval_bad_inputs(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "missing"), "--quick"]) == 2
    assert "model folder not found" in capsys.readouterr().err
    bad = tmp_path / "p.jsonl"
    bad.write_text("{not json\n")
    assert main(["eval", "--prompts", str(bad), "--quick", "--out", str(tmp_path / "r")]) == 2
