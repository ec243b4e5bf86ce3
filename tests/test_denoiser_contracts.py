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

    def test_every_parameter_gets_a_gradient(self):
        """Each width computes with its own modulation/QK-norm tables: over all widths, every parameter is used."""
        from helpers.builders import perturb_ as perturb

        model = perturb(self.build()).train()
        x, t, cond = self.inputs(model)
        loss = 0
        for name in model.variants:
            loss = loss + model.set_variant(name)(x, t, cond).square().mean()
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, f"parameters without gradient: {missing[:5]}"


class TestThreeStageDiTElasticPerWidth(TestThreeStageDiTElastic):
    """Per-width modulation (each width its own timestep MLP + adaLN map), at the narrowest width."""

    spec = {"preset": "nano-elastic", "elastic_modulation": "per_width"}

    def build(self, **overrides):
        return DenoiserContract.build(self, **overrides).set_variant("tiny")


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


def test_registry_specs_and_folders(tmp_path):
    import json

    from snapgen.models import IsotropicDiT, ThreeStageDiT, load_model, resolve_config

    nano = resolve_config("snapgenpp/nano")[1]
    assert resolve_config("nano") == resolve_config("three_stage_dit/nano") == ("three_stage_dit", nano)
    assert resolve_config({"preset": "nano", "width": 128})[1] == nano.replace(width=128)
    assert resolve_config({"family": "isotropic_dit", "preset": "nano"}) == ("isotropic_dit", nano)
    assert resolve_config(nano) == ("three_stage_dit", nano)  # a config builds its default family
    with pytest.raises(ValueError, match=r"unknown ThreeStageDiTConfig keys \['widht'\].*valid keys"):
        build_model({"preset": "nano", "widht": 128})
    # load_model dispatches on the saved class name; a config.json without one is the default family
    iso = build_model({"family": "isotropic_dit", "preset": "nano"})
    iso.save_pretrained(tmp_path / "iso")
    assert type(load_model(tmp_path / "iso")) is IsotropicDiT
    build_model("nano").save_pretrained(tmp_path / "plain")
    cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    del cfg["_class_name"]
    (tmp_path / "plain" / "config.json").write_text(json.dumps(cfg))
    assert type(load_model(tmp_path / "plain")) is ThreeStageDiT
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        (tmp_path / "plain" / "config.json").unlink() or load_model(tmp_path / "plain")
