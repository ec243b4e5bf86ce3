"""k-means weight quantization: the clustering against a brute-force reference, packing, bit allocation,
the whole recipe on a small model (bits, error, size), storage round trip and the pipeline integration."""

import os

import pytest
import torch
from helpers.builders import build_elastic_pipeline, dummy_inputs, perturb_
from helpers.fakes import FakeEncoder

from snapgen.export.quantize import (QuantizedTensor, allocate_bits, kmeans_1d, load_quantized, quantize_model,
                                     quantize_pipeline, save_quantized)
from snapgen.models import ThreeStageDiT, preset


def test_kmeans_recovers_clusters_and_assigns_to_the_nearest_centroid():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([-1.0, -0.2, 0.3, 2.0])
    x = centers[torch.randint(0, 4, (5000,), generator=g)] + 0.01 * torch.randn(5000, generator=g)
    lut, idx = kmeans_1d(x.view(50, 100), 4)
    torch.testing.assert_close(lut, centers, atol=0.01, rtol=0)
    brute = (x[:, None] - lut[None]).abs().argmin(1)
    assert torch.equal(idx.flatten(), brute)
    # Lloyd never does worse than its quantile start on generic data
    w = torch.randn(4096, generator=g)
    lut16, idx16 = kmeans_1d(w, 16)
    q0 = torch.quantile(w, (torch.arange(16) + 0.5) / 16)
    err_q = (w - q0[(w[:, None] - q0[None]).abs().argmin(1)]).pow(2).mean()
    assert (w - lut16[idx16]).pow(2).mean() <= err_q


@pytest.mark.parametrize("bits,n", [(4, 7), (4, 1000), (8, 33)])
def test_index_packing_round_trips(bits, n):
    idx = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(n))
    q = QuantizedTensor(torch.zeros(2**bits), idx, bits)
    packed = q.packed()
    assert packed.dtype == torch.uint8
    assert packed.numel() == ((n + 1) // 2 if bits == 4 else n)
    assert torch.equal(QuantizedTensor.unpack(packed, bits, (n,)), idx)


def test_bit_allocation_gives_8_bits_to_the_most_sensitive_within_budget():
    sizes = {"a": 1000, "b": 1000, "c": 8000}
    sens = {"a": 0.5, "b": 0.01, "c": 0.2}
    bits = allocate_bits(sizes, sens, 4.5)  # 0.5 * 10000 = 5000 extra bit-params: a (4000) fits, c does not
    assert bits == {"a": 8, "b": 4, "c": 4}
    assert allocate_bits(sizes, sens, 4.0) == {"a": 4, "b": 4, "c": 4}
    with pytest.raises(ValueError):
        allocate_bits(sizes, sens, 9)


def test_quantize_model_reaches_the_bit_target_with_small_error_and_a_small_file(tmp_path):
    torch.manual_seed(0)
    model = perturb_(ThreeStageDiT(preset("nano-elastic").variant_config("full")), std=0.05)
    batches = [dummy_inputs(model.config, B=4, seed=s) for s in range(3)]
    ref = model(*batches[0]).detach()
    model, report = quantize_model(model, batches, 4.3, finetune_steps=30, progress=lambda *_: None)
    assert 4.0 <= report["mean_bits"] <= 4.3 and report["layers_8bit"]
    assert report["relative_error"] <= report["relative_error_before_finetune"]
    assert report["relative_error"] < 0.05
    # every clustered weight takes at most 2**bits distinct values
    for name, q in model._snapgen_quant.items():
        assert dict(model.named_parameters())[name].unique().numel() <= 2**q.bits
    save_quantized(model, tmp_path / "q", report)
    model.save_pretrained(tmp_path / "fp32")
    ratio = os.path.getsize(tmp_path / "fp32" / "model.safetensors") / os.path.getsize(tmp_path / "q" / "quantized.safetensors")
    assert ratio > 3.5, ratio
    loaded = load_quantized(tmp_path / "q")
    torch.testing.assert_close(loaded(*batches[0]), model(*batches[0]), atol=2e-3, rtol=0)
    assert (loaded(*batches[0]) - ref).pow(2).mean() / ref.pow(2).mean() < 0.05
    (tmp_path / "q" / "quantized.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="corrupt"):
        load_quantized(tmp_path / "q")


def test_quantized_pipeline_loads_like_any_pipeline(tmp_path):
    from snapgen.pipelines import TextToImagePipeline

    pipe = build_elastic_pipeline(text_encoder=FakeEncoder()).set_variant("small")
    out = quantize_pipeline(pipe, tmp_path / "q", ["a red circle", "two blue stars", "a green heart", "pizza"],
                            finetune_steps=10, progress=lambda *_: None)
    q = TextToImagePipeline.from_pretrained(out, text_encoder=FakeEncoder())
    assert q.transformer.config.width == 64 and q.variants == ["full"]
    a = q(["a red circle"], seed=1, return_latents=True)
    b = pipe(["a red circle"], seed=1, return_latents=True)
    assert (a - b).pow(2).mean() / b.pow(2).mean() < 0.05
