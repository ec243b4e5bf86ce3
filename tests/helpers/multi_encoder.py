"""The two-encoder builders that test_multi_encoder*.py share (the fixtures ``berts`` / ``vae_dir`` are in
conftest): two tiny random BERTs of widths 16 and 24 (max lengths 16 and 12), a pipeline over them and a flow run
config that trains on them."""

import torch

from snapgen.models import ThreeStageDiT
from snapgen.pipelines import PipelineConfig, TextToImagePipeline
from snapgen.text import TextConditioning
from snapgen.vae import Autoencoder, AutoencoderConfig

from .builders import SHIFT, TEXT_DIM, nano, perturb_

DIMS = (16, 24)        # the two tiny BERTs' widths
LENGTHS = [16, 12]     # their max lengths
PROMPTS = ["a red circle to the left of a blue square", "two green hearts"]


def two_encoder_pipeline(specs):
    """A nano pipeline whose conditioning concatenates the two encoders' tokens (non-trivial null tokens)."""
    torch.manual_seed(0)
    transformer = perturb_(ThreeStageDiT(nano(in_channels=4, vae_factor=2, text_dim=TEXT_DIM)), std=0.05)
    vae = Autoencoder(AutoencoderConfig(channels=(8, 8), latent_channels=4, groups=4, scaling_factor=0.7,
                                        shift_factor=0.1))
    cond_kw = {"encoder_dims": list(DIMS), "out_dim": TEXT_DIM}
    conditioning = TextConditioning(**cond_kw)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for null in conditioning.null_embeddings:
            null.normal_(0, 1.0, generator=g)
    config = PipelineConfig(text_encoder=list(specs), text_max_length=list(LENGTHS), conditioning=cond_kw,
                            resolution=(16, 16), steps=3, guidance=3.0, shift=SHIFT)
    return TextToImagePipeline(transformer, conditioning, vae, config)


def two_encoder_run(tmp_path, berts, vae_dir, run, steps, data=None, **text):
    """A flow run (nano, 16 px scenes, cache in tmp_path) on the two encoders; ``text`` overrides its text keys."""
    from snapgen.train.config import TrainConfig

    return TrainConfig.from_dict({
        "task": "flow", "run_dir": str(tmp_path / run), "seed": 3, "steps": steps, "batch_size": 4, "threads": 1,
        "model": {"preset": "nano"}, "vae": {"path": str(vae_dir)},
        "text": {"encoder": list(berts), "max_length": list(LENGTHS), "drop_prob": [0.3, 0.2],
                 "drop_all_prob": 0.1, **text},
        "data": data or {"spec": {"type": "scenes", "resolution": 16, "length": 12}, "num_samples": 12,
                         "cache": str(tmp_path / "latents.safetensors")},
        "optim": {"lr": 1e-3, "warmup": 2, "schedule": "constant"},
        "log_every": 1, "ckpt_every": 3, "sample_every": 0, "keep_checkpoints": 3})
