"""Latent shards (issue 8): encoding image shards into aspect buckets, streaming them with bucketed batches
and an exact position, and the trainer reading them (resume reproduces the uninterrupted run, on 1 and 2 ranks)."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from helpers.runs import feature_encoder, losses, torchrun, weights

from snapgen.data.base import Sample, center_crop_resize, image_to_tensor
from snapgen.data.buckets import aspect_buckets, assign_bucket
from snapgen.data.latent_shards import BucketBatcher, LatentShardStream, collate_latents, encode_shards
from snapgen.data.shards import pack_shards
from snapgen.train import Trainer
from snapgen.train.config import TrainConfig
from snapgen.vae import Autoencoder, AutoencoderConfig

BUCKETS = aspect_buckets(32, 8, 2.0)  # (40, 24), (32, 32), (24, 40), (24, 48): latent grids at VAE factor 2
N = 60


class FakeText:
    """A deterministic text encoder: features from the caption's bytes, one token per word (prefix mask)."""

    dim = 32

    def encode(self, captions):
        L = max(len(c.split()) for c in captions)
        tok = torch.zeros(len(captions), L + 2, self.dim)  # trailing padding, as real tokenizers give
        mask = torch.zeros(len(captions), L + 2, dtype=torch.bool)
        for i, c in enumerate(captions):
            for j, w in enumerate(c.split()):
                g = torch.Generator().manual_seed(sum(w.encode()) * 31 + j)
                tok[i, j] = torch.randn(self.dim, generator=g)
                mask[i, j] = True
        return tok, mask


def _images(n=N, seed=0):
    """Captioned images of random sizes (portrait, square, landscape), colours from the seed."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = [(44, 26), (30, 30), (20, 36), (33, 31), (27, 50)][i % 5]
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        words = " ".join(rng.choice(["red", "blue", "circle", "square", "two", "left", "of"], 1 + i % 4))
        out.append(Sample(Image.fromarray(arr), f"{words} {i}", {"i": i}))
    return out


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return Autoencoder(AutoencoderConfig(channels=(8, 8), latent_channels=4, groups=4)).eval()


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, vae):
    root = tmp_path_factory.mktemp("latent")
    pack_shards(_images(), root / "images", shard_size=6, progress=False)
    encode_shards(root / "images", root / "latents", vae, FakeText(), buckets=BUCKETS, batch_size=4,
                  progress=False)
    return root


def test_encode_writes_bucketed_latents_equal_to_the_autoencoder(encoded, vae):
    index = json.loads((encoded / "latents" / "index.json").read_text())
    assert index["format"] == "snapgen-latent-shards" and index["total"] == N and index["skipped"] == 0
    assert index["latent_channels"] == 4 and index["text_dim"] == 32 and len(index["shards"]) == 10
    want = {}
    for s in _images():
        h, w = BUCKETS[assign_bucket(s.image.size[1], s.image.size[0], BUCKETS)]
        want[f"{h}x{w}"] = want.get(f"{h}x{w}", 0) + 1
    assert index["sizes"] == dict(sorted(want.items())) and len(want) == 4
    stream = LatentShardStream(encoded / "latents", shuffle=False)
    it = iter(stream)
    # PNG round trip is lossless, so each latent equals the autoencoder on the bucket-resized image
    for s in _images()[:7]:
        got = next(it)
        size = BUCKETS[assign_bucket(s.image.size[1], s.image.size[0], BUCKETS)]
        x = image_to_tensor(center_crop_resize(s.image, size))[None]
        with torch.no_grad():
            ref = vae.encode_latents(x)[0]
        assert got.latent.shape == (4, size[0] // 2, size[1] // 2)
        torch.testing.assert_close(got.latent, ref, atol=1e-5, rtol=1e-5)
        tok, mask = FakeText().encode([s.caption])
        n = len(s.caption.split())
        assert got.caption == s.caption and got.mask.tolist() == [True] * n
        torch.testing.assert_close(got.text.float(), tok[0, :n].half().float())


def test_encode_again_keeps_finished_shards(encoded, vae, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(encoded / "latents", out)
    (out / "index.json").unlink()
    os.remove(out / "latent-000003.safetensors")  # as if interrupted before this shard
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("latent-*")}
    encode_shards(encoded / "images", out, vae, FakeText(), buckets=BUCKETS, batch_size=4, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("latent-*")}
    assert all(after[k] == v for k, v in before.items()) and "latent-000003.safetensors" in after
    a = json.loads((encoded / "latents" / "index.json").read_text())
    b = json.loads((out / "index.json").read_text())
    assert {k: v for k, v in a.items() if k != "source"} == {k: v for k, v in b.items() if k != "source"}


def _keys(batch):
    return [s.meta["key"] for s in batch]


def test_batches_hold_one_bucket_and_ranks_read_disjoint_samples(encoded):
    seen = []
    for rank in range(2):
        stream = LatentShardStream(encoded / "latents", rank=rank, world=2, seed=5)
        batcher = BucketBatcher(stream, 4)
        it = iter(batcher)
        keys = []
        for _ in range(5):
            batch = next(it)
            assert len({tuple(s.latent.shape) for s in batch}) == 1
            x0, (tok, mask) = collate_latents(batch)
            assert x0.shape[0] == 4 and tok.shape[:2] == mask.shape and mask.any(1).all()
            keys += _keys(batch)
        assert stream.state()["epoch"] == 0  # 20 of this rank's ~30 samples: still the first epoch
        seen.append(set(keys))
        assert len(keys) == len(set(keys))
    assert not seen[0] & seen[1]


def test_batcher_resumes_exactly_with_waiting_samples(encoded):
    def fresh():
        return BucketBatcher(LatentShardStream(encoded / "latents", seed=1), 4)

    ref = iter(fresh())
    want = [_keys(next(ref)) for _ in range(30)]  # > one epoch (60 samples -> 15 batches)
    b = fresh()
    it = iter(b)
    got = [_keys(next(it)) for _ in range(7)]
    state = json.loads(json.dumps(b.state()))  # survives JSON (the checkpoint format)
    assert any(state["pending"]), "the cut should fall while a bucket waits for samples"
    b2 = fresh()
    b2.load_state(state)
    it2 = iter(b2)
    got += [_keys(next(it2)) for _ in range(23)]
    assert got == want


def test_corrupt_latent_shard_is_skipped_and_counted(encoded, tmp_path):
    out = tmp_path / "broken"
    shutil.copytree(encoded / "latents", out)
    (out / "latent-000002.safetensors").write_bytes(b"not a safetensors file")
    stream = LatentShardStream(out, shuffle=False)
    it = iter(stream)
    keys = [next(it).meta["key"] for _ in range(N - 6)]
    assert len(set(keys)) == N - 6 and stream.state()["skipped"] == 6


def test_wrong_folder_errors(encoded, tmp_path):
    with pytest.raises(FileNotFoundError, match="snapgen data encode"):
        LatentShardStream(tmp_path)
    with pytest.raises(ValueError, match="not latent shards"):
        LatentShardStream(encoded / "images")


# --- the trainer on latent shards -------------------------------------------------------------------------
def shard_config(tmp_path, encoded, run, steps, **extra):
    cfg = {"task": "flow", "run_dir": str(tmp_path / run), "seed": 3, "steps": steps, "batch_size": 4,
           "threads": 1, "model": {"preset": "nano"}, "text": {"encoder": feature_encoder(tmp_path), "drop_prob": 0.2},
           "data": {"shards": str(encoded / "latents")},
           "optim": {"lr": 1e-3, "warmup": 2, "schedule": "constant"},
           "log_every": 1, "ckpt_every": 3, "sample_every": 0, "keep_checkpoints": 5}
    cfg.update(extra)
    return cfg


def test_trainer_streams_buckets_and_resumes_exactly(tmp_path, encoded):
    whole = Trainer(TrainConfig.from_dict(shard_config(tmp_path, encoded, "whole", 18)), progress=False)
    grids = []
    orig = whole.task._stream_batch

    def spy(step, part):
        out = orig(step, part)
        grids.append(tuple(out[0].shape[2:]))
        return out

    whole.task._stream_batch = spy
    whole.fit()
    assert len(set(grids)) == 4  # every bucket's grid went through the model (18 batches > 1 epoch)
    part = Trainer(TrainConfig.from_dict(shard_config(tmp_path, encoded, "part", 9)), progress=False)
    part.fit()
    state = json.loads((tmp_path / "part" / "checkpoints" / "step_0000009" / "data_state.json").read_text())
    assert state["world"] == 1 and state["ranks"][0]["stream"]["offset"] > 0
    shutil.rmtree(tmp_path / "part" / "final")
    Trainer(TrainConfig.from_dict(shard_config(tmp_path, encoded, "part", 18)), progress=False).fit()
    assert losses(tmp_path / "part") == losses(tmp_path / "whole")


@pytest.mark.distributed
def test_two_ranks_stream_disjoint_shards_and_resume_exactly(tmp_path, encoded):
    def write(name, cfg):
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(cfg))
        return p

    whole = torchrun(write("whole", shard_config(tmp_path, encoded, "whole", 6)))
    assert whole.returncode == 0, whole.stderr[-3000:]
    state = json.loads((tmp_path / "whole" / "checkpoints" / "step_0000006" / "data_state.json").read_text())
    assert state["world"] == 2 and len(state["ranks"]) == 2
    a = weights(tmp_path / "whole")
    part = shard_config(tmp_path, encoded, "part", 3)
    assert torchrun(write("part", part)).returncode == 0
    shutil.rmtree(tmp_path / "part" / "final")
    part["steps"] = 6
    resumed = torchrun(write("part6", part))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path / "part") == losses(tmp_path / "whole")
    b = weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_encode(tmp_path, encoded, vae, capsys):
    from helpers.builders import save_tiny_bert

    from snapgen.cli import main

    vae.save_pretrained(tmp_path / "vae")
    bert = save_tiny_bert(tmp_path / "bert", 32)
    assert main(["data", "encode", str(encoded / "images"), "--out", str(tmp_path / "lat"), "--vae",
                 str(tmp_path / "vae"), "--text", str(bert), "--buckets", "32", "--multiple", "8"]) == 0
    out = capsys.readouterr().out
    assert "4 aspect buckets" in out and "data.shards" in out
    index = json.loads((tmp_path / "lat" / "index.json").read_text())
    assert index["total"] == N and index["text_dim"] == 32 and len(index["sizes"]) == 4
    assert main(["data", "encode", str(tmp_path), "--out", str(tmp_path / "x"), "--vae", str(tmp_path / "vae")]) == 2
    assert "snapgen data pack" in capsys.readouterr().err
