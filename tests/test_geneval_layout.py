"""GenEval's folder layout both ways (issue 20 §4): snapgen generate --geneval-metadata writes it (resumable,
atomic, seed of sample k = --seed + k), snapgen eval --images scores any folder in it with SceneEval."""

import json

import numpy as np

import pytest
from helpers.builders import ENC_DIM, build_pipeline, save_tiny_bert
from helpers.fakes import FakeEncoder
from PIL import Image

from snapgen.cli import main
from snapgen.data.scenes import CATEGORIES, SceneDataset
from snapgen.eval.detector import load_detector
from snapgen.eval.geneval_layout import read_layout, write_layout
from snapgen.eval.run import evaluate_folder
from snapgen.eval.sceneeval import evaluate_images, load_prompts, metadata_from_scene, prompt_path


@pytest.fixture
def no_encoder(tmp_path, monkeypatch):
    """Alignment and FD off (they load MiniLM and real renders): the tests here are about the verdicts."""
    monkeypatch.setenv("SNAPGEN_IMAGE_ENCODER", str(tmp_path / "no-encoder"))


@pytest.fixture(scope="module")
def tiny():
    pipe = build_pipeline(text_encoder=FakeEncoder())
    return lambda prompt, seed: pipe([prompt], seed=seed)[0]


def _metas(n_per_tag=1):
    prompts = load_prompts(prompt_path("sceneeval"))
    return [next(p for p in prompts[k:] if p["tag"] == t) for t in CATEGORIES for k in range(n_per_tag)]


def test_round_trip_gives_the_verdicts_of_scoring_the_images_directly(tmp_path, tiny, no_encoder):
    metas = _metas()
    done = write_layout(tiny, metas, tmp_path / "g", n_samples=2, base_seed=3, progress=False)
    assert done == {"generated": 12, "skipped": 0, "folders": 6}
    assert json.loads((tmp_path / "g" / "00002" / "metadata.jsonl").read_text()) == metas[2]
    assert sorted(p.name for p in (tmp_path / "g" / "00002" / "samples").iterdir()) == ["0000.png", "0001.png"]
    summary = evaluate_folder(tmp_path / "g", out_dir=tmp_path / "r", progress=False)
    rows = [json.loads(ln) for ln in (tmp_path / "r" / "results.jsonl").read_text().splitlines()]
    images = [tiny(m["prompt"], 3 + k) for m in metas for k in range(2)]  # sample k = seed base + k
    direct = evaluate_images(images, [m for m in metas for _ in range(2)], load_detector())
    # GenEval's file numbering (0000.png = sample 0), the base seed recorded beside: seeds read back are 3 + k
    assert json.loads((tmp_path / "g" / "snapgen_layout.json").read_text()) == {"base_seed": 3}
    assert [(r["prompt_index"], r["seed"]) for r in rows] == [(i, 3 + k) for i in range(6) for k in range(2)]
    assert [(r["correct"], r["reason"], r["detections"]) for r in rows] == \
           [(d["correct"], d["reason"], json.loads(json.dumps(d["detections"]))) for d in direct]
    assert summary["images"] == 12 and summary["prompts"] == 6 and summary["seeds"] == 2
    assert set(summary["intervals"]) == set(CATEGORIES) | {"overall"}


def test_an_interrupted_run_resumes_without_regenerating(tmp_path, tiny):
    metas = _metas()[:3]
    calls = []

    def dies_after_four(prompt, seed):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append((prompt, seed))
        return tiny(prompt, seed)

    with pytest.raises(KeyboardInterrupt):
        write_layout(dies_after_four, metas, tmp_path / "g", n_samples=3, progress=False)
    written = sorted((tmp_path / "g").glob("*/samples/*.png"))
    assert len(written) == 4 and not list((tmp_path / "g").rglob("*.tmp"))  # nothing half-written
    # a kill mid-save leaves a temporary file (here of a sample a run with a larger --n-samples was writing)
    (tmp_path / "g" / "00002" / "samples" / ".0007.png.tmp").write_bytes(b"partial")
    mtimes = {p: p.stat().st_mtime_ns for p in written}
    calls.clear()
    done = write_layout(lambda p, s: (calls.append((p, s)), tiny(p, s))[1], metas, tmp_path / "g", 3, progress=False)
    assert done == {"generated": 5, "skipped": 4, "folders": 3} and len(calls) == 5
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    assert not list((tmp_path / "g").rglob("*.tmp"))
    write_layout(tiny, metas, tmp_path / "ref", 3, progress=False)  # uninterrupted: the same images
    for p in sorted((tmp_path / "ref").glob("*/samples/*.png")):
        q = tmp_path / "g" / p.relative_to(tmp_path / "ref")
        assert Image.open(p).tobytes() == Image.open(q).tobytes(), q
    with pytest.raises(ValueError, match="another prompt"):
        write_layout(tiny, metas[1:], tmp_path / "g", 1, progress=False)


def _render_layout(root, per_tag=8):
    for cat in CATEGORIES:
        ds = SceneDataset(64, split="val", categories=[cat], seed=1)
        for i in range(per_tag):
            folder = root / f"{CATEGORIES.index(cat) * per_tag + i:05d}"
            (folder / "samples").mkdir(parents=True)
            s = ds[i]
            (folder / "metadata.jsonl").write_text(json.dumps(metadata_from_scene(s)) + "\n")
            s.image.save(folder / "samples" / "0000.png")


def test_eval_images_scores_renders_at_the_ceiling_with_intervals(tmp_path, capsys, monkeypatch):
    _render_layout(tmp_path / "renders")
    monkeypatch.chdir(tmp_path)  # a relative --images folder, as people type it
    assert main(["eval", "--images", "renders", "--json", "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sceneeval"]["overall"] >= 0.98 and summary["images"] == 48
    assert summary["images_dir"] == str((tmp_path / "renders").resolve()) and summary["model"] is None
    ci = summary["intervals"]["overall"]
    assert ci["lo"] <= summary["sceneeval"]["overall"] <= ci["hi"] and "bootstrap" in summary["interval_method"]
    a = summary["alignment_interval"]
    assert summary["alignment"] is not None and a["lo"] <= summary["alignment"] <= a["hi"]
    report = (tmp_path / "r" / "report.md").read_text()
    assert f"{summary['sceneeval']['overall']:.3f} [{ci['lo']:.2f}, {ci['hi']:.2f}]" in report
    rows = [json.loads(ln) for ln in (tmp_path / "r" / "results.jsonl").read_text().splitlines()]
    assert rows[5]["image"] == "00005/samples/0000.png" and isinstance(rows[5]["alignment"], float)


def test_eval_images_names_the_first_unsupported_class_and_its_folder(tmp_path, capsys):
    _render_layout(tmp_path / "g", per_tag=1)
    (tmp_path / "g" / "00003" / "metadata.jsonl").write_text(json.dumps(
        {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}) + "\n")
    (tmp_path / "g" / "00004" / "metadata.jsonl").write_text(json.dumps(
        {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}) + "\n")
    assert main(["eval", "--images", str(tmp_path / "g"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "prompt folder 00003" in err and "'dog'" in err and "cat" not in err and len(err.splitlines()) == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no numbered prompt folders"):
        read_layout(tmp_path / "empty")
    assert main(["eval", "--images", str(tmp_path / "g"), "--steps", "3"]) == 2


def test_generate_cli_writes_the_layout_for_any_classes_with_seed_base_plus_k(tmp_path, capsys):
    bert = save_tiny_bert(tmp_path / "bert", ENC_DIM)
    model = tmp_path / "model"
    build_pipeline(text_encoder_spec=str(bert)).save_pretrained(model)
    meta = tmp_path / "geneval.jsonl"
    meta.write_text("\n".join(json.dumps(m) for m in [
        {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
        {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}],
         "prompt": "a photo of two dogs"}]) + "\n\n")
    args = ["generate", "--geneval-metadata", str(meta), "--outdir", str(tmp_path / "g"), "--n-samples", "2",
            "--seed", "5", "--model", str(model), "--no-progress"]
    assert main(args) == 0
    assert "generated 4, kept 0" in capsys.readouterr().out
    assert main(args) == 0
    assert "generated 0, kept 4" in capsys.readouterr().out
    assert main(["generate", "a photo of two dogs", "--seed", "6", "--model", str(model), "--no-progress",
                 "--out", str(tmp_path / "one.png")]) == 0
    assert Image.open(tmp_path / "one.png").tobytes() == \
           Image.open(tmp_path / "g" / "00001" / "samples" / "0001.png").tobytes()
    assert json.loads((tmp_path / "g" / "00001" / "metadata.jsonl").read_text())["include"][0]["class"] == "dog"
    capsys.readouterr()
    assert main(["generate", "a prompt", "--geneval-metadata", str(meta), "--outdir", str(tmp_path / "x")]) == 2
    assert "cannot go with --geneval-metadata" in capsys.readouterr().err
    assert main(["generate", "--geneval-metadata", str(meta)]) == 2


def test_eval_save_images_then_images_rescores_the_same_cells_and_verdicts(tmp_path, no_encoder):
    """`snapgen eval --save-images D` keeps the run's own images (batched per seed) in the layout, so `--images D`
    re-scores exactly them: same (prompt_index, seed) cells, same verdicts and detections."""
    from snapgen.eval.run import run_evaluation

    pipe = build_pipeline(text_encoder=FakeEncoder())
    sets = tmp_path / "p.jsonl"
    sets.write_text("".join(json.dumps(m) + "\n" for m in _metas()))
    run_evaluation(prompts_path=sets, seeds=2, out_dir=tmp_path / "a", progress=False, pipe=pipe,
                   save_images=tmp_path / "imgs")
    evaluate_folder(tmp_path / "imgs", out_dir=tmp_path / "b", progress=False)
    a, b = ([json.loads(ln) for ln in (tmp_path / r / "results.jsonl").read_text().splitlines()] for r in "ab")
    key = lambda r: (r["prompt_index"], r["seed"])  # noqa: E731
    a, b = sorted(a, key=key), sorted(b, key=key)
    assert [key(r) for r in a] == [key(r) for r in b] == [(i, s) for i in range(6) for s in range(2)]
    assert [(r["correct"], r["reason"], r["detections"]) for r in a] == \
           [(r["correct"], r["reason"], r["detections"]) for r in b]


def test_an_eval_cell_is_the_one_prompt_image_and_the_layout_sample_of_its_seed(tmp_path, no_encoder):
    """Every image of `snapgen eval` has its own generator (seed=[s] * batch): cell (p, s), batched with other
    prompts (batch_size 4 splits the 6 prompts 4 + 2), is the image of pipe([p], seed=s) -- `snapgen generate p
    --seed s` -- and sample s of `generate --geneval-metadata` (write_layout): pixel for pixel alone, to one 8-bit
    level when batched. Both the loaded
    pipeline (model folder) and an external pipe (pipe=)."""
    from snapgen.eval.run import run_evaluation
    from snapgen.pipelines import TextToImagePipeline

    metas = _metas()
    sets = tmp_path / "p.jsonl"
    sets.write_text("".join(json.dumps(m) + "\n" for m in metas))
    model = tmp_path / "model"
    build_pipeline(text_encoder_spec=str(save_tiny_bert(tmp_path / "bert", ENC_DIM))).save_pretrained(model)
    summary = run_evaluation(model, prompts_path=sets, seeds=2, out_dir=tmp_path / "a", progress=False,
                             batch_size=4, save_images=tmp_path / "loaded", device="cpu")
    assert summary["noise"] == "per_image"  # what tells these runs from those made with batch noise
    external = build_pipeline(text_encoder=FakeEncoder())
    run_evaluation(prompts_path=sets, seeds=2, out_dir=tmp_path / "b", progress=False, pipe=external,
                   batch_size=4, save_images=tmp_path / "external")
    for name, pipe in (("loaded", TextToImagePipeline.from_pretrained(model)), ("external", external)):
        write_layout(lambda prompt, seed, pipe=pipe: pipe([prompt], seed=seed)[0], metas, tmp_path / f"{name}_gl",
                     n_samples=2, progress=False)
        for i, m in enumerate(metas):
            for s in range(2):
                cell = np.asarray(Image.open(tmp_path / name / f"{i:05d}" / "samples" / f"{s:04d}.png"), np.int16)
                alone = np.asarray(pipe([m["prompt"]], seed=s)[0], np.int16)
                # batched with other prompts vs alone: equal latents up to the rounding of batched matmuls, which
                # can flip one 8-bit level (seen with one thread per xdist worker); the layout sample is exact
                assert np.abs(cell - alone).max() <= 1, (name, i, s)
                layout = np.asarray(Image.open(tmp_path / f"{name}_gl" / f"{i:05d}" / "samples" / f"{s:04d}.png"),
                                    np.int16)
                assert np.array_equal(layout, alone), (name, i, s)


def test_eval_save_images_refuses_a_folder_that_holds_other_images(tmp_path, capsys):
    """Old samples would be re-scored together with the new ones: a non-empty --save-images folder is an error
    (one line, exit 2) before anything is generated."""
    (tmp_path / "imgs" / "00000").mkdir(parents=True)
    assert main(["eval", "--quick", "--save-images", str(tmp_path / "imgs"), "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 2
    assert "is not empty" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_eval_images_refuses_generation_flags_by_name(tmp_path, capsys):
    _render_layout(tmp_path / "renders")
    assert main(["eval", "--images", str(tmp_path / "renders"), "--seeds", "2", "--steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "--seeds, --steps cannot apply to --images" in err and len(err.strip().splitlines()) == 1


def test_a_layout_keeps_its_base_seed_a_foreign_one_reads_as_indices(tmp_path, tiny):
    """Resuming with another --seed would mix two seed streams in one folder: refused, naming the recorded seed.
    A folder written by another tool (no snapgen_layout.json) has seeds = sample indices; a damaged record is an
    error, not a silent 0."""
    metas = _metas()[:2]
    write_layout(tiny, metas, tmp_path / "g", n_samples=1, base_seed=100, progress=False)
    assert [r["seed"] for r in read_layout(tmp_path / "g")] == [100, 100]
    with pytest.raises(ValueError, match="drawn with --seed 100, not 0"):
        write_layout(tiny, metas, tmp_path / "g", n_samples=2, base_seed=0, progress=False)
    assert sorted(p.name for p in (tmp_path / "g" / "00000" / "samples").iterdir()) == ["0000.png"]  # untouched
    assert write_layout(tiny, metas, tmp_path / "g", n_samples=2, base_seed=100, progress=False)["generated"] == 2
    assert [r["seed"] for r in read_layout(tmp_path / "g")] == [100, 101, 100, 101]
    (tmp_path / "g" / "snapgen_layout.json").unlink()
    assert [r["seed"] for r in read_layout(tmp_path / "g")] == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="drawn with --seed 0, not 100"):  # no record + samples = seeds 0..
        write_layout(tiny, metas, tmp_path / "g", n_samples=2, base_seed=100, progress=False)
    (tmp_path / "g" / "snapgen_layout.json").write_text('{"base_seed": "7"}')
    with pytest.raises(ValueError, match="base_seed"):
        read_layout(tmp_path / "g")
