"""snapgen eval --compare (issue 20 §3): paired comparison of two report folders from the CLI."""

import json

import numpy as np
import pytest

from snapgen.cli import main
from snapgen.data.scenes import CATEGORIES
from snapgen.eval.stats import compare_rows


def _rows(p, prompts=8, seeds=3, seed=0, alignment=True):
    rng = np.random.default_rng(seed)
    rows = []
    for t, tag in enumerate(CATEGORIES):
        for j in range(prompts):
            for s in range(seeds):
                r = {"index": len(rows), "tag": tag, "prompt": f"{tag} prompt {j}", "prompt_index": t * prompts + j,
                     "seed": s, "correct": bool(rng.random() < p), "reason": ""}
                if alignment:
                    r["alignment"] = float(rng.normal(0.3, 0.02))
                rows.append(r)
    return rows


def _folder(path, rows, fd=1.0):
    path.mkdir(parents=True)
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps({"fd": fd}))
    return str(path)


def test_compare_a_run_with_itself_and_with_a_better_one(tmp_path, capsys):
    rows = _rows(0.4)
    a = _folder(tmp_path / "a", rows)
    assert main(["eval", "--compare", a, a, "--json", "--out", str(tmp_path / "same")]) == 0
    same = json.loads(capsys.readouterr().out)
    assert set(same["scores"]) == set(CATEGORIES) | {"overall", "alignment"}
    for k, r in same["scores"].items():
        assert r["diff"] == 0 and r["lo"] == 0 == r["hi"], k
        if k != "alignment":
            assert r["wins"] == r["losses"] == 0 and r["p"] == 1.0 and r["ties"] > 0
    rng = np.random.default_rng(1)
    better = [{**r, "correct": r["correct"] or bool(rng.random() < 0.6)} for r in rows]  # B only fixes failures
    b = _folder(tmp_path / "b", better, fd=2.0)
    assert main(["eval", "--compare", a, b, "--out", str(tmp_path / "ab")]) == 0
    assert "compare.md" in capsys.readouterr().out
    c = json.loads((tmp_path / "ab" / "compare.json").read_text())
    o = c["scores"]["overall"]
    assert o["losses"] == 0 and o["wins"] > 30 and 0 < o["p"] < 1e-6 and o["lo"] > 0
    assert o["diff"] == pytest.approx(o["b"] - o["a"], abs=1e-4) and c["fd"] == {"a": 1.0, "b": 2.0}
    assert c["images"] == len(rows) and c["prompts"] == 48 and c["seeds"] == 3
    md = (tmp_path / "ab" / "compare.md").read_text()
    assert f"{o['diff']:+.3f} [{o['lo']:+.2f}, {o['hi']:+.2f}]" in md and "ignores" in md


def test_compare_refuses_runs_on_other_prompts_or_seeds(tmp_path, capsys):
    rows = _rows(0.5)
    a = _folder(tmp_path / "a", rows)
    b = _folder(tmp_path / "b", [r for r in rows if not (r["prompt_index"] == 7 and r["seed"] == 2)])
    assert main(["eval", "--compare", a, b, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "do not share" in err and "prompt 7 seed 2" in err and "in A but not in B" in err
    assert len(err.strip().splitlines()) == 1
    other = [{**r, "prompt": "something else"} if r["prompt_index"] == 3 else r for r in rows]
    assert main(["eval", "--compare", a, _folder(tmp_path / "c", other), "--out", str(tmp_path / "r")]) == 2
    assert "prompt 3 seed 0" in capsys.readouterr().err
    old = [{k: v for k, v in r.items() if k != "prompt_index"} for r in rows]  # written before prompt_index
    assert main(["eval", "--compare", a, _folder(tmp_path / "old", old), "--out", str(tmp_path / "r")]) == 2
    assert "evaluate it again" in capsys.readouterr().err
    assert main(["eval", "--compare", a, str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r" / "compare.json").exists()


def test_compare_without_alignment_has_no_alignment_row():
    rows = _rows(0.5, alignment=False)
    assert "alignment" not in compare_rows(rows, rows, n_boot=50)


def test_compare_two_model_folders_evaluates_both_on_the_same_prompts_and_seeds(tmp_path, monkeypatch, capsys):
    from helpers.builders import ENC_DIM, build_pipeline, save_tiny_bert

    from snapgen.eval.sceneeval import load_prompts, prompt_path, save_prompts

    monkeypatch.setenv("SNAPGEN_IMAGE_ENCODER", str(tmp_path / "no-encoder"))  # the tiny BERT is not MiniLM
    model = tmp_path / "model"
    build_pipeline(text_encoder_spec=str(save_tiny_bert(tmp_path / "bert", ENC_DIM))).save_pretrained(model)
    prompts = tmp_path / "p.jsonl"
    save_prompts(load_prompts(prompt_path("sceneeval"))[10:14], prompts)
    assert main(["eval", "--compare", str(model), str(model), "--prompts", str(prompts), "--seeds", "2",
                 "--steps", "1", "--json", "--no-progress", "--out", str(tmp_path / "c")]) == 0
    c = json.loads(capsys.readouterr().out)
    assert c["images"] == 8 and c["prompts"] == 4 and c["seeds"] == 2  # the same generator twice: no difference
    assert all(r["diff"] == 0 and r["wins"] == r["losses"] == 0 for r in c["scores"].values())
    assert (tmp_path / "c" / "a" / "summary.json").exists() and (tmp_path / "c" / "b" / "results.jsonl").exists()
