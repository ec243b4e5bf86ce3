"""What a run folder and an eval report record: env.json beside config.yaml (refreshed on resume), and the
folders actually loaded (the model given by --model or $SNAPGEN_MODEL, detector, encoders) with env.describe()."""

import json

import yaml
from helpers.builders import save_tiny_bert
from helpers.builders import ENC_DIM, build_pipeline
from helpers.runs import flow_config

from snapgen.cli import main
from snapgen.eval.run import run_evaluation
from snapgen.eval.sceneeval import load_prompts, prompt_path, save_prompts
from snapgen.train import Trainer
from snapgen.train.config import TrainConfig


def test_run_folder_records_env_json_and_refreshes_it_on_resume(tmp_path):
    stages = []

    def fit(steps):
        t = Trainer(TrainConfig.from_dict(flow_config(tmp_path, "run", steps)), progress=False)
        real = t._record_env
        t._record_env = lambda stage: (stages.append((stage, t.step)), real(stage))[1]
        t.fit()
        return t

    t = fit(3)
    run = tmp_path / "run"
    config_before = (run / "config.yaml").read_text()
    assert yaml.safe_load(config_before) == t.cfg.to_dict()  # config.yaml holds the config only
    first = json.loads((run / "env.json").read_text())
    assert first["stage"] == "finish" and first["step"] == 3 and first["world"] == 1
    att = first["numerics"]["attention"]
    assert att["requested"] == "auto" and att["auto_choices"]  # nano's ASSA ran through "auto"
    assert att["kernel_status"] in ("built", "build-failed", "disabled-by-env")
    assert {"torch", "threads", "cpu", "variables"} <= set(first)

    fit(5)  # resume: same config, more steps
    assert stages == [("start", 0), ("finish", 3), ("start", 3), ("finish", 5)]
    assert json.loads((run / "env.json").read_text())["step"] == 5
    assert not (run / "env.json.tmp").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["steps"] == 5


def _tiny_model(tmp_path):
    bert = save_tiny_bert(tmp_path / "bert", ENC_DIM)
    folder = tmp_path / "tiny_model"
    build_pipeline(text_encoder_spec=str(bert)).save_pretrained(folder)
    prompts = tmp_path / "prompts.jsonl"
    save_prompts(load_prompts(prompt_path("sceneeval"))[:2], prompts)
    return folder, bert, prompts


def test_eval_report_names_the_model_actually_loaded(tmp_path, monkeypatch, capsys):
    folder, bert, prompts = _tiny_model(tmp_path)
    # through $SNAPGEN_MODEL (no --model): the report used to say models/snapgen-micro. The image encoder
    # is pointed at a missing folder: alignment needs MiniLM's 384-d features, the tiny BERT has 16
    monkeypatch.setenv("SNAPGEN_MODEL", str(folder))
    monkeypatch.setenv("SNAPGEN_IMAGE_ENCODER", str(tmp_path / "no-encoder"))
    out = tmp_path / "report"
    assert main(["eval", "--prompts", str(prompts), "--seeds", "1", "--steps", "1", "--json", "--no-progress",
                 "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["model"] == str(folder.resolve())
    assert summary["detector"].endswith("scene-detector")
    assert summary["text_encoder"] == str(bert.resolve())
    assert summary["image_encoder"] is None  # not loaded
    assert any("no-encoder" in n for n in summary["notes"])
    environment = summary["environment"]
    assert environment["variables"]["SNAPGEN_MODEL"] == str(folder)
    assert environment["numerics"]["attention"]["requested"] == "auto"
    report = (out / "report.md").read_text()
    assert str(folder.resolve()) in report and "snapgen-micro" not in report and "BNA backend" in report

    # through the model argument (--model), with $SNAPGEN_MODEL pointing elsewhere
    monkeypatch.setenv("SNAPGEN_MODEL", str(tmp_path / "not-this-one"))
    s = run_evaluation(str(folder), str(prompts), seeds=1, steps=1, progress=False, out_dir=tmp_path / "r2")
    assert s["model"] == str(folder.resolve())
