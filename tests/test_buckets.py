"""Aspect-ratio buckets: sizes, assignment, one-bucket batches, rank split, resume; the model runs every bucket."""


import numpy as np
import torch

from snapgen.data.buckets import BucketBatchSampler, aspect_buckets, assign_bucket
from snapgen.models import ThreeStageDiT, preset


def test_buckets_have_the_base_area_and_valid_sides():
    buckets = aspect_buckets(256, 32, 2.0)
    assert (256, 256) in buckets and len(buckets) >= 5
    for h, w in buckets:
        assert h % 32 == 0 and w % 32 == 0 and max(h / w, w / h) <= 2.0
        assert abs(h * w / 256**2 - 1) < 0.15
    ratios = [w / h for h, w in buckets]
    assert ratios == sorted(ratios) and ratios[0] < 0.6 and ratios[-1] > 1.6
    assert buckets[assign_bucket(512, 1024, buckets)][1] > buckets[assign_bucket(512, 1024, buckets)][0]
    assert buckets[assign_bucket(300, 300, buckets)] == (256, 256)


def test_batches_hold_one_bucket_split_across_ranks_and_resume():
    rng = np.random.default_rng(0)
    bucket_of = rng.integers(0, 4, 200).tolist()
    s = BucketBatchSampler(bucket_of, 8, seed=1)
    it = iter(s)
    whole = [next(it) for _ in range(40)]  # crosses an epoch
    for b, idx in whole:
        assert all(bucket_of[i] == b for i in idx) and len(idx) == 8
    epoch0 = s.epoch_batches(0)
    assert len({int(i) for _, idx in epoch0 for i in idx}) == sum(len(idx) for _, idx in epoch0)  # no repeats
    ranks = [BucketBatchSampler(bucket_of, 8, seed=1, rank=r, world=2) for r in range(2)]
    firsts = [next(iter(r)) for r in ranks]
    assert [int(b) for b, _ in firsts] == [epoch0[0][0], epoch0[1][0]]  # batch i -> rank i % world
    a = BucketBatchSampler(bucket_of, 8, seed=1)
    ita = iter(a)
    head = [next(ita) for _ in range(13)]
    b = BucketBatchSampler(bucket_of, 8, seed=1)
    b.load_state(a.state())
    itb = iter(b)
    tail = [next(itb) for _ in range(27)]
    assert all(x[0] == y[0] and np.array_equal(x[1], y[1]) for x, y in zip(head + tail, whole))


def test_model_runs_each_bucket_grid():
    cfg = preset("nano")
    model = ThreeStageDiT(cfg)
    multiple = cfg.vae_factor * cfg.downsample
    for h, w in aspect_buckets(128, multiple, 2.0):
        x = torch.randn(1, cfg.in_channels, h // cfg.vae_factor, w // cfg.vae_factor)
        assert model(x, torch.rand(1), {"text": torch.randn(1, 3, cfg.text_dim)}).shape == x.shape
