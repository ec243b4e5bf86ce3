"""The shipped model (models/snapgen-micro): a K-DMD distilled elastic supernetwork whose every variant samples
in 4 steps without CFG by default, with the 28-step teacher one switch away (issue 6 §5)."""

from snapgen.pipelines import TextToImagePipeline, default_model_dir

FEW_STEP = {"sampler": "few_step", "steps": 4, "guidance": 1.0, "shift": 3.0}


def test_shipped_model_is_a_4_step_distilled_supernetwork_with_its_teacher():
    pipe = TextToImagePipeline.from_pretrained(default_model_dir())
    assert pipe.distilled and pipe.variant == "full"
    assert set(pipe.config.adapters) == set(pipe.variants) == {"tiny", "small", "full"}
    for v in pipe.variants:
        assert pipe.set_variant(v).sampling_settings() == FEW_STEP
    pipe.set_variant("small").use_base()  # the teacher: adapters off, its own 20-step Euler sampler with CFG
    s = pipe.sampling_settings()
    assert s["sampler"] == "euler" and s["steps"] >= 20 and s["guidance"] > 1.0
