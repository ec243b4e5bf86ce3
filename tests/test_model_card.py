"""The README.md model card that save_pretrained writes (snapgen.nn.card, snapgen.pipelines.card): YAML front
matter the Hugging Face Hub reads, the class, the parameter counts and how to load."""

import re

import torch
import yaml
from helpers.builders import build_elastic_pipeline, build_pipeline, nano
from helpers.fakes import FakeEncoder

from snapgen.env import REPO_ROOT
from snapgen.models import ThreeStageDiT, load_model
from snapgen.nn.card import format_count, read_model_card
from snapgen.pipelines import TextToImagePipeline
from snapgen.pipelines.card import write_pipeline_card
from snapgen.vae import Autoencoder, AutoencoderConfig


def _front_matter(path):
    """Parse the card's front matter with plain PyYAML (not huggingface_hub) so the format itself is checked."""
    text = path.read_text()
    m = re.match(r"---\n(.*?)\n---\n", text, flags=re.S)
    assert m, f"no YAML front matter at the top of {path}"
    return yaml.safe_load(m.group(1)), text[m.end():]


def _params(module):
    return sum(p.numel() for p in module.parameters())


def test_model_card_names_the_class_parameters_and_how_to_load(tmp_path):
    torch.manual_seed(0)
    model = ThreeStageDiT(nano())
    model.save_pretrained(tmp_path / "m", dtype=torch.float16)
    meta, body = _front_matter(tmp_path / "m" / "README.md")
    assert meta["library_name"] == "snapgen" and meta["license"] == "apache-2.0"
    assert {"snapgen", "three_stage_dit", "ThreeStageDiT"} <= set(meta["tags"])
    assert "pipeline_tag" not in meta  # a bare denoiser is not a text-to-image pipeline
    assert body.startswith("\n# ThreeStageDiT\n")
    n = _params(model)
    assert f"**{n:,} (" in body and "(float16)" in body  # the count and the dtype actually saved
    assert 'load_model("path/to/this-folder")' in body
    assert "| `width` | `64` |" in body  # the config table
    # huggingface_hub reads the same card
    hub_meta, hub_text = read_model_card(tmp_path / "m")
    assert hub_meta["library_name"] == "snapgen" and hub_text.strip() == body.strip()
    # the card changes nothing that loading reads
    reloaded = load_model(tmp_path / "m").final_layer.linear.weight
    assert torch.equal(reloaded, model.final_layer.linear.weight.half().float())


def test_other_model_classes_and_opting_out(tmp_path):
    vae = Autoencoder(AutoencoderConfig(channels=(8, 8), latent_channels=4, groups=4))
    vae.save_pretrained(tmp_path / "vae")
    meta, body = _front_matter(tmp_path / "vae" / "README.md")
    assert "Autoencoder" in meta["tags"] and f"**{format_count(_params(vae))} parameters**" in body
    assert "from snapgen.vae.autoencoder import Autoencoder" in body  # not a registered family: its own loader
    ThreeStageDiT(nano()).save_pretrained(tmp_path / "bare", model_card=False)
    assert not (tmp_path / "bare" / "README.md").exists()


def test_pipeline_card_has_the_text_to_image_tag_and_every_part(tmp_path):
    pipe = build_elastic_pipeline()
    pipe.save_pretrained(tmp_path / "my-pipe")
    meta, body = _front_matter(tmp_path / "my-pipe" / "README.md")
    assert meta["pipeline_tag"] == "text-to-image" and meta["library_name"] == "snapgen"
    assert {"snapgen", "text-to-image", "three_stage_dit", "elastic"} <= set(meta["tags"])
    assert "distilled" not in meta["tags"]
    assert body.startswith("\n# my-pipe\n")
    rows = {line.split("|")[1].strip(): line for line in body.splitlines() if line.startswith("| ")}
    assert f"{_params(pipe.transformer):,}" in rows["denoiser (`transformer/`)"]
    assert f"{_params(pipe.vae):,}" in rows["autoencoder (`vae/`)"]
    for v in ("tiny", "small", "full"):  # each sub-network's standalone size: what extract() gives
        row = next(r for k, r in rows.items() if k.startswith(f"sub-network `{v}`"))
        assert f"{_params(pipe.extract(v).transformer):,}" in row
    assert "pip install 'snapgen[minilm]'" in body and "TextToImagePipeline.from_pretrained(" in body
    assert "| `steps` | `3` |" in body
    # the card is not part of what loading reads, and a reloaded pipeline re-saves the same card
    back = TextToImagePipeline.from_pretrained(tmp_path / "my-pipe", text_encoder=FakeEncoder())
    back.save_pretrained(tmp_path / "again" / "my-pipe")
    again = (tmp_path / "again" / "my-pipe" / "README.md").read_text()
    assert again == (tmp_path / "my-pipe" / "README.md").read_text()


def test_plain_pipeline_with_a_local_encoder(tmp_path):
    build_pipeline(text_encoder_spec=str(tmp_path / "bert")).save_pretrained(tmp_path / "p")
    meta, body = _front_matter(tmp_path / "p" / "README.md")
    assert "elastic" not in meta["tags"] and "sub-network" not in body
    assert f"`{tmp_path / 'bert'}`" in body and "pip install snapgen\n" in body


def test_shipped_model_card_is_what_the_code_writes(tmp_path):
    """models/snapgen-micro/README.md was written by write_pipeline_card without re-saving the weights; after a
    change to the card, regenerate it: python -c "from snapgen.pipelines import TextToImagePipeline as P;
    from snapgen.pipelines.card import write_pipeline_card as w; w(P.from_pretrained('models/snapgen-micro'),
    'models/snapgen-micro')" """
    shipped = REPO_ROOT / "models" / "snapgen-micro"
    pipe = TextToImagePipeline.from_pretrained(shipped)
    out = tmp_path / shipped.name
    out.mkdir()
    write_pipeline_card(pipe, out, torch.float16)  # the shipped weights are float16 (the card reads them)
    assert (shipped / "README.md").read_text() == (out / "README.md").read_text()
    meta, body = _front_matter(shipped / "README.md")
    assert {"distilled", "few-step", "elastic"} <= set(meta["tags"]) and "(float16)" in body
    assert "few-step adapter `kdmd_tiny`" in body and "`pipe.use_base()`" in body
