"""Every registered Denoiser family passes the contract in tests/contracts/denoiser.py."""

import pytest
from contracts.denoiser import DenoiserContract

from snapgen.models import MODELS, build_model


class TestThreeStageDiT(DenoiserContract):
    spec = "snapgenpp/nano"
    sizes = [(16, 16), (16, 32), (32, 16), (8, 24)]
    bad_size = (18, 16)


class TestThreeStageDiTElastic(DenoiserContract):
    """The supernetwork at a narrow width is a Denoiser too."""

    spec = "snapgenpp/nano-elastic"
    sizes = [(16, 16), (8, 16)]
    bad_size = (16, 10)

    def build(self, **overrides):
        return super().build(**overrides).set_variant("small")

    def test_save_load_exact_through_the_registry(self, tmp_path):  # the variant is state, not config
        model = self.build().set_variant("full")
        assert model.variant == "full"
        super().test_save_load_exact_through_the_registry(tmp_path)


class TestThreeStageDiTDense(DenoiserContract):
    spec = {"preset": "nano", "outer_attention": "dense"}
    sizes = [(16, 16), (16, 8)]


class TestIsotropicDiT(DenoiserContract):
    spec = {"family": "isotropic_dit", "preset": "nano"}
    sizes = [(16, 16), (8, 12)]
    bad_size = (9, 8)


def test_every_registered_family_has_a_contract_test():
    tested = {build_model(c.spec).family for c in DenoiserContract.__subclasses__()}
    assert tested == set(MODELS.names()), f"families without a contract test: {set(MODELS.names()) - tested}"


def test_registry_errors_name_the_known_entries():
    with pytest.raises(KeyError, match="known: .*snapgenpp/nano"):
        build_model("snapgenpp/nanoo")
    with pytest.raises(KeyError, match="unknown model family 'unet'; known: isotropic_dit, three_stage_dit"):
        build_model({"family": "unet"})
    with pytest.raises(KeyError, match="ambiguous|unknown model preset"):
        build_model("nanoo")
