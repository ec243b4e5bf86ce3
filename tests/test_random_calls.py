"""Device-correct randomness: seeded draws are made on the generator's device and moved (snapgen.utils.random),
never by passing a CPU generator together with another device (PyTorch refuses that for CUDA tensors, which
crashed every GPU run at step 0). The scan keeps the pattern from coming back."""

import ast
from pathlib import Path

import pytest
import torch
from helpers.builders import build_pipeline
from helpers.fakes import FakeEncoder

from snapgen.utils.random import rand, randn

SRC = Path(__file__).resolve().parents[1] / "src" / "snapgen"
RANDOM = {"randn", "rand", "randint", "randperm", "normal", "multinomial", "bernoulli", "poisson",
          "randn_like", "rand_like", "randint_like"}
ALLOWED = {"utils/random.py"}  # the one place that draws with a generator (on the generator's own device)


def offending_calls(source: str) -> list[int]:
    """Lines of random calls that pass a generator together with a device (or a *_like, which takes the
    device of its input)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in RANDOM:
            kws = {k.arg for k in node.keywords}
            if "generator" in kws and ("device" in kws or getattr(node.func, "attr", "").endswith("_like")):
                out.append(node.lineno)
    return out


def test_no_random_call_passes_a_generator_and_a_device():
    found = {str(p.relative_to(SRC)): lines for p in sorted(SRC.rglob("*.py"))
             if str(p.relative_to(SRC)) not in ALLOWED and (lines := offending_calls(p.read_text()))}
    assert not found, f"draw with snapgen.utils.random.randn/rand instead: {found}"


def test_the_scan_catches_the_pattern():
    assert offending_calls("x = torch.randn(3, generator=g, device=d)") == [1]
    assert offending_calls("x = torch.rand(\n  3,\n  generator=g,\n  dtype=t, device=x.device)") == [1]
    assert offending_calls("x = torch.randn_like(y, generator=g)") == [1]
    assert offending_calls("x = torch.randn(3, generator=g).to(d)") == []


def test_draws_equal_the_plain_cpu_call_and_happen_on_the_generators_device():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.testing.assert_close(randn((8, 8), g1), torch.randn(8, 8, generator=g2), rtol=0, atol=0)
    # other dtypes: the fp32 stream cast (fp64 draws are another stream), so a seed means one noise everywhere
    torch.testing.assert_close(randn((8, 8), g1, dtype=torch.float64),
                               torch.randn(8, 8, generator=g2).double(), rtol=0, atol=0)
    torch.testing.assert_close(rand(7, g1), torch.rand(7, generator=g2))
    # another target device: the values come from the CPU generator's stream (its state advances exactly as
    # for a CPU draw), then move; "meta" stands in for CUDA here
    out = randn((4, 3), g1, device="meta")
    torch.randn(4, 3, generator=g2)
    assert out.is_meta and out.shape == (4, 3) and torch.equal(g1.get_state(), g2.get_state())
    assert randn(2, None, device="meta").is_meta  # no generator: the target device's own RNG


def test_a_list_of_generators_draws_row_i_from_generator_i_alone():
    """Per-image noise: row i is the one-row draw of generator i (its state advances exactly as for that draw),
    whatever the other rows' generators; on another device the rows are drawn on the CPU and moved."""
    from snapgen.utils.random import seed_generators

    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    out = randn((3, 4, 5), gens)
    refs = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    for i, g in enumerate(refs):
        torch.testing.assert_close(out[i:i + 1], torch.randn(1, 4, 5, generator=g), rtol=0, atol=0)
        assert torch.equal(gens[i].get_state(), g.get_state())
    # the same seed in another batch, at another row: the same row
    torch.testing.assert_close(randn((2, 4, 5), [torch.Generator().manual_seed(s) for s in (7, 5)])[1], out[0],
                               rtol=0, atol=0)
    uniform = rand((2, 3), [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    torch.testing.assert_close(uniform[1], torch.rand(3, generator=torch.Generator().manual_seed(2)),
                               rtol=0, atol=0)
    assert randn((3, 4), seed_generators([1, 2, 3], 3), device="meta", dtype=torch.float16).is_meta
    with pytest.raises(ValueError, match=r"2 generator\(s\) for a draw of shape \(3, 4\)"):
        randn((3, 4), gens[:2])


def test_seed_generators_reads_an_int_a_list_or_none():
    from snapgen.utils.random import seed_generators

    g = seed_generators(4, 3)
    assert isinstance(g, torch.Generator)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(4).get_state())
    gs = seed_generators([4, 9], 2)
    assert [type(x) for x in gs] == [torch.Generator] * 2
    assert torch.equal(gs[1].get_state(), torch.Generator().manual_seed(9).get_state())
    assert seed_generators(None, 2) is None
    with pytest.raises(ValueError, match=r"list of 1 seed\(s\) but 2 prompt\(s\)"):
        seed_generators([4], 2)
    with pytest.raises(TypeError, match="a seed list holds integers"):
        seed_generators([4, 0.5], 2)


def test_pipeline_moves_with_to_and_samples_the_same_noise():
    pipe = build_pipeline(text_encoder=FakeEncoder())
    ref = pipe(["a red circle"], steps=2, seed=3, return_latents=True)
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
    assert pipe.to(torch.float64) is pipe and pipe.dtype == torch.float64
    assert next(pipe.vae.parameters()).dtype == torch.float64
    assert next(pipe.conditioning.parameters()).dtype == torch.float64
    out = pipe(["a red circle"], steps=2, seed=3, return_latents=True)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), ref, atol=1e-4, rtol=1e-4)  # same seeded noise, fp64 compute
    pipe.to("cpu", torch.float32)
    assert torch.equal(pipe(["a red circle"], steps=2, seed=3, return_latents=True), ref)


@pytest.mark.parametrize("bad", [None])
def test_to_without_arguments_is_a_no_op(bad):
    pipe = build_pipeline(text_encoder=FakeEncoder())
    assert pipe.to(bad).device == torch.device("cpu") and pipe.dtype == torch.float32
