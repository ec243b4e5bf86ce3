"""Session setup and the fixtures several test files share. Plain helpers live in ``tests/helpers/``
(``from helpers.builders import nano``); test files never import from conftest or from each other."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# one process: at most 2 threads (the CI machine's cores); under pytest-xdist (`make test` runs `-n 2`) the cores are
# shared by the workers, so each gets its share (oversubscribed OpenMP threads spin and slow everything down)
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads()) // _workers))

from helpers.builders import ENC_DIM, build_distill_base, build_elastic_pipeline, nano, save_tiny_bert  # noqa: E402

from helpers.multi_encoder import DIMS  # noqa: E402

from snapgen.models import ThreeStageDiT  # noqa: E402
from snapgen.vae import Autoencoder, AutoencoderConfig  # noqa: E402


@pytest.fixture
def nano_model():
    torch.manual_seed(0)
    return ThreeStageDiT(nano())


@pytest.fixture(scope="module")
def elastic_folder(tmp_path_factory):
    """A saved tiny elastic pipeline (nano-elastic, variants tiny / small / full) whose text encoder is a tiny
    random BERT: loadable by path, exportable. Built once per test module."""
    bert_dir = save_tiny_bert(tmp_path_factory.mktemp("bert"), ENC_DIM)
    out = tmp_path_factory.mktemp("elastic_pipe")
    build_elastic_pipeline(text_encoder_spec=str(bert_dir)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def berts(tmp_path_factory):
    """Two tiny random BERT folders (MiniLM's tokenizer) of widths 16 and 24, different seeds (helpers.multi_encoder)."""
    return [str(save_tiny_bert(tmp_path_factory.mktemp(f"bert{d}"), d, seed=i)) for i, d in enumerate(DIMS)]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny random autoencoder folder (factor 2, 4 latent channels)."""
    d = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    Autoencoder(AutoencoderConfig(channels=(8, 8), latent_channels=4, groups=4)).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny elastic pipeline that the dmd / kdmd task tests distil (test_distill_task, test_distributed)."""
    return build_distill_base(tmp_path_factory.mktemp("base"))
