"""Loading by Hugging Face Hub id (snapgen.nn.hub.resolve_pretrained): every from_pretrained / load_model /
load_autoencoder / HFTextEncoder accepts a folder or an id, which is looked up in the Hugging Face cache first.
The cache here is a folder laid out as huggingface_hub writes it (helpers.builders.fake_hub_snapshot); the
tests run offline (conftest sets HF_HUB_OFFLINE=1), so nothing is ever downloaded."""

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
from helpers.builders import (ENC_DIM, build_pipeline, dummy_inputs, fake_hub_snapshot, nano, perturb_,
                              save_tiny_bert)
from helpers.fakes import FakeEncoder

from snapgen.models import ThreeStageDiT, load_model
from snapgen.nn.hub import is_hub_id, resolve_pretrained
from snapgen.pipelines import TextToImagePipeline
from snapgen.text import HFTextEncoder
from snapgen.vae import Autoencoder, AutoencoderConfig, load_autoencoder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache; huggingface_hub read HF_HUB_CACHE when it was imported, so the constant it
    reads at call time is set too (test_packaging checks the environment variable in a fresh process)."""
    folder = tmp_path / "hf-cache"
    folder.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return folder


def _model(tmp_path, seed=0):
    torch.manual_seed(seed)
    model = perturb_(ThreeStageDiT(nano()), seed=seed)
    model.save_pretrained(tmp_path / f"model{seed}")
    return model, tmp_path / f"model{seed}"


def _same(a, b):
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_model_loads_from_the_cache_by_id_and_revision(tmp_path, cache):
    model, folder = _model(tmp_path, seed=0)
    other, other_folder = _model(tmp_path, seed=1)
    snapshot = fake_hub_snapshot(cache, "org/nano", folder)
    fake_hub_snapshot(cache, "org/nano", other_folder, revision="v2")  # a second revision of the same repo
    assert resolve_pretrained("org/nano") == snapshot
    for loaded in (load_model("org/nano"), ThreeStageDiT.from_pretrained("org/nano")):
        _same(loaded, model)
    _same(load_model("org/nano@v2"), other)  # the revision picks the other snapshot
    x, t, text, mask = dummy_inputs(model.config)
    cond = {"text": text, "text_mask": mask}
    assert torch.equal(load_model("org/nano")(x, t, cond), model(x, t, cond))


def test_pipeline_autoencoder_and_text_encoder_load_by_id(tmp_path, cache):
    pipe = build_pipeline(text_encoder=FakeEncoder())
    pipe.save_pretrained(tmp_path / "pipe")
    fake_hub_snapshot(cache, "org/tiny-pipe", tmp_path / "pipe")
    back = TextToImagePipeline.from_pretrained("org/tiny-pipe", text_encoder=FakeEncoder())
    _same(back.transformer, pipe.transformer)
    assert back.config == pipe.config
    assert back("a red circle", seed=0)[0].tobytes() == pipe("a red circle", seed=0)[0].tobytes()

    vae = Autoencoder(AutoencoderConfig(channels=(8, 8), latent_channels=4, groups=4))
    vae.save_pretrained(tmp_path / "vae")
    fake_hub_snapshot(cache, "vae-only", tmp_path / "vae")   # a namespace-less id
    _same(load_autoencoder("vae-only"), vae)

    bert = save_tiny_bert(tmp_path / "bert", ENC_DIM)
    fake_hub_snapshot(cache, "org/tiny-bert", bert)
    by_id, by_path = HFTextEncoder("org/tiny-bert"), HFTextEncoder(bert)
    assert by_id.name == "org/tiny-bert" and by_path.name == bert.name  # cached features are labelled by the id
    a, b = by_id.encode(["a red circle"]), by_path.encode(["a red circle"])
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_local_folder_wins_over_a_cached_id_of_the_same_name(tmp_path, cache, monkeypatch):
    local, local_folder = _model(tmp_path, seed=0)
    cached, cached_folder = _model(tmp_path, seed=1)
    fake_hub_snapshot(cache, "org/nano", cached_folder)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    local_folder.rename(tmp_path / "org" / "nano")
    _same(load_model("org/nano"), local)  # ./org/nano exists: the cache is not consulted


def test_missing_id_names_both_possibilities_and_how_to_download(tmp_path, cache):
    _, folder = _model(tmp_path)
    fake_hub_snapshot(cache, "org/nano", folder)
    with pytest.raises(FileNotFoundError) as e:
        load_model("org/missing")
    msg = str(e.value)
    assert "'org/missing' not found: it is not a local folder" in msg
    assert f"cache ({cache})" in msg and "folder written by save_pretrained" in msg
    assert "`hf download org/missing`" in msg and "HF_HUB_OFFLINE is set" in msg
    with pytest.raises(FileNotFoundError, match="hf download org/nano --revision v9"):
        load_model("org/nano@v9")  # the repo is cached, that revision is not
    with pytest.raises(FileNotFoundError, match="model folder not found"):  # the old message for pipelines
        TextToImagePipeline.from_pretrained(tmp_path / "nowhere", text_encoder=FakeEncoder())


def test_paths_that_cannot_be_ids_never_reach_huggingface_hub(tmp_path, cache, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError(f"snapshot_download called for {args}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    for path in (tmp_path / "missing", "./org/name", "~/no/such/model", "a/b/c", "org--x/y", "x/y.git", ""):
        with pytest.raises(FileNotFoundError, match="folder not found"):
            load_model(path)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        load_model(tmp_path / "file")
    with pytest.raises(TypeError, match="folder path or a Hugging Face Hub id"):
        load_model(3)
    assert is_hub_id("org/name") and is_hub_id("name") and is_hub_id("org/name@v1.0")
    assert not any(is_hub_id(s) for s in ("/abs/path", "a/b/c", "-x/y", "x/y.", "o/n@", "o/n@a b"))
