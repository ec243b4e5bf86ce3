"""RNG states in checkpoints (snapgen.train.rng): the CPU RNG, the task generator and each rank's CUDA RNG are
saved and restored by both checkpoint formats. CUDA is replaced by a fake ``torch.cuda`` (no GPU here), which
records what the code reads and sets; old checkpoints without CUDA states still load."""

import warnings

import pytest
import torch
from helpers.runs import flow_config

from snapgen.train import Trainer, rng
from snapgen.train.checkpoint import load_checkpoint, save_checkpoint
from snapgen.train.config import TrainConfig
from snapgen.train.rng import capture_rng, restore_rng


class FakeCuda:
    """The part of ``torch.cuda`` the RNG code uses; device ``i`` starts with the 16 bytes ``[i, i, ...]``."""

    def __init__(self, count: int = 2, current: int = 0):
        self.count, self.current = count, current
        self.states = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(count)}

    def is_available(self):
        return self.count > 0

    def device_count(self):
        return self.count

    def current_device(self):
        return self.current

    def get_rng_state(self, device):
        return self.states[device].clone()

    def set_rng_state(self, state, device):
        assert state.dtype == torch.uint8 and state.shape == (16,)
        self.states[device] = state.clone()


class FakeDist:
    """Rank 0 of a 2-rank run whose rank 1 trains on a device with the state ``theirs``."""

    enabled = True

    def __init__(self, theirs):
        self.theirs = theirs

    def gather(self, obj):
        return [obj, self.theirs]


def state(v):
    return torch.full((16,), v, dtype=torch.uint8)


def test_round_trip_restores_cpu_task_and_the_training_devices_cuda_state():
    cuda, g = FakeCuda(2), torch.Generator().manual_seed(3)
    cuda.states[1] = state(7)
    saved = capture_rng(g, "cuda:1", cuda=cuda)
    assert set(saved) == {"torch", "task", "cuda.0"}  # rank 0's device only (device 1 here), not every GPU
    assert torch.equal(saved["cuda.0"], state(7))
    cpu, task = torch.rand(3), torch.rand(3, generator=g)
    cuda.states[1] = state(99)  # the run went on drawing
    restore_rng(saved, g, "cuda:1", cuda=cuda)
    assert torch.equal(cuda.states[1], state(7)) and torch.equal(cuda.states[0], state(0))
    assert torch.equal(torch.rand(3), cpu) and torch.equal(torch.rand(3, generator=g), task)


def test_device_without_index_is_the_current_device():
    cuda = FakeCuda(3, current=2)
    cuda.states[2] = state(5)
    assert torch.equal(capture_rng(None, "cuda", cuda=cuda)["cuda.0"], state(5))


def test_every_rank_saves_and_restores_its_own_device_state():
    cuda = FakeCuda(2)
    saved = capture_rng(None, "cuda:0", FakeDist(state(42).tolist()), cuda=cuda)
    assert torch.equal(saved["cuda.0"], state(0)) and torch.equal(saved["cuda.1"], state(42))
    rank1 = FakeCuda(2)  # rank 1's process, training on its cuda:1
    restore_rng(saved, None, "cuda:1", rank=1, world=2, cuda=rank1)
    assert torch.equal(rank1.states[1], state(42)) and torch.equal(rank1.states[0], state(0))


def test_checkpoint_file_keeps_the_cuda_states(tmp_path):
    cuda = FakeCuda(1)
    cuda.states[0] = state(11)
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p])
    path = save_checkpoint(tmp_path, 1, {"p": p.detach()}, {}, opt, capture_rng(None, "cuda:0", cuda=cuda), {})
    assert torch.equal(load_checkpoint(path)["rng"]["cuda.0"], state(11))


def test_old_checkpoint_without_cuda_states_loads():
    g = torch.Generator().manual_seed(1)
    old = {"torch": torch.get_rng_state(), "task": g.get_state()}  # what snapgen wrote before
    draw = torch.rand(2, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restore_rng(old, g, "cpu")  # CPU run: nothing to warn about
    assert torch.equal(torch.rand(2, generator=g), draw)
    cuda = FakeCuda(1)
    with pytest.warns(RuntimeWarning, match="no CUDA RNG state.*restart from the seed"):
        restore_rng(old, g, "cuda:0", cuda=cuda)
    assert torch.equal(cuda.states[0], state(0))


def test_cuda_states_resumed_without_cuda_or_on_another_world_size_warn():
    saved = {"torch": torch.get_rng_state(), "cuda.0": state(4), "cuda.1": state(5)}
    with pytest.warns(RuntimeWarning, match=r"CUDA RNG states of 2 rank\(s\), but this run does not train on CUDA"):
        restore_rng(saved, None, "cpu", cuda=FakeCuda(0))
    with pytest.warns(RuntimeWarning, match=r"cuda available: False"):
        restore_rng(saved, None, "cuda:0", cuda=FakeCuda(0))
    cuda = FakeCuda(1)
    with pytest.warns(RuntimeWarning, match=r"2 rank\(s\), this run has 1.*Resume with 2"):
        restore_rng(saved, None, "cuda:0", rank=0, world=1, cuda=cuda)
    assert torch.equal(cuda.states[0], state(4))  # rank 0 still gets rank 0's state
    rank3 = FakeCuda(4)
    with warnings.catch_warnings():  # only rank 0 warns; rank 3 has no saved state and keeps its seeded one
        warnings.simplefilter("error")
        restore_rng(saved, None, "cuda:3", rank=3, world=4, cuda=rank3)
    assert torch.equal(rank3.states[3], state(3))


def test_task_generator_state_of_another_kind_is_a_clear_error():
    saved = {"torch": torch.get_rng_state(), "task": state(1)}  # a CUDA generator's 16 bytes
    with pytest.raises(ValueError, match="does not fit this task's cpu generator.*same device type"):
        restore_rng(saved, torch.Generator(), "cpu")


@pytest.mark.parametrize("fmt", ["safetensors", "dcp"])
def test_trainer_checkpoints_carry_the_cuda_state(tmp_path, monkeypatch, fmt):
    """Both checkpoint paths of the trainer (the safetensors one and the FSDP/DCP one, here at world 1) store
    the training device's CUDA state and set it back on resume."""
    from snapgen.train.sharded import save_sharded

    cuda = FakeCuda(1)
    monkeypatch.setattr(rng, "_torch_cuda", lambda: cuda)
    cfg = TrainConfig.from_dict(flow_config(tmp_path, "run", 2, ckpt_every=100))
    trainer = Trainer(cfg, progress=False)
    trainer.task.prepare(trainer.run_dir)
    trainer.device = torch.device("cuda", 0)  # the modules stay on CPU; only the RNG bookkeeping sees CUDA
    cuda.states[0] = state(23)
    path = trainer.save() if fmt == "safetensors" else save_sharded(trainer)
    assert (path / "dcp").is_dir() == (fmt == "dcp")
    cuda.states[0] = state(200)
    again = Trainer(cfg, progress=False)
    again.task.prepare(again.run_dir)
    again.device = torch.device("cuda", 0)
    assert again.resume()
    assert torch.equal(cuda.states[0], state(23))
