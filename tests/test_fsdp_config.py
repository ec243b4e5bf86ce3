"""FSDP2 settings of the trainer (snapgen.train.distributed), in one process: the MixedPrecisionPolicy and
reshard_after_forward chosen from the config, what fully_shard then does (on a 1-rank gloo group), and sharded
(DCP) checkpoints written with get_optimizer_state_dict resuming exactly (also ones in the earlier layout).
The 2-rank runs are in test_distributed.py."""

import pytest
import torch
import torch.distributed as dist
from helpers.builders import dummy_inputs, nano, perturb_
from helpers.runs import flow_config, losses

from snapgen.models import ThreeStageDiT
from snapgen.models.layers import DiTBlock
from snapgen.tasks import build_task
from snapgen.train import Trainer
from snapgen.train.config import TrainConfig
from snapgen.train.distributed import (load_dcp, mixed_precision_policy, read_settings, reshard_after_forward,
                                       shard_modules)
from snapgen.train.sharded import save_sharded


def test_policy_from_the_precision_setting():
    bf16 = mixed_precision_policy(TrainConfig(task="flow", precision="bf16").precision)
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.float32)  # fp32 master + reduce
    assert bf16.cast_forward_inputs
    fp32 = mixed_precision_policy(TrainConfig(task="flow").precision)
    assert (fp32.param_dtype, fp32.reduce_dtype) == (torch.float32, torch.float32)
    with pytest.raises(ValueError, match="precision must be 'fp32' or 'bf16'"):
        mixed_precision_policy("fp16")


def test_reshard_choice():
    assert reshard_after_forward("auto", 1) == (False, True)    # roots stay gathered, blocks one at a time
    assert reshard_after_forward("auto", 3) == (False, False)   # elastic: 3 forwards per block and step
    assert reshard_after_forward(True, 3) == (True, True)
    assert reshard_after_forward(False, 1) == (False, False)
    with pytest.raises(ValueError, match="reshard_after_forward must be auto, true or false"):
        read_settings({"reshard_after_forward": "sometimes"}, "flow", ("ddp", "fsdp"), enabled=False)
    with pytest.raises(ValueError, match=r"unknown keys in 'distributed': \['reshard'\]"):
        read_settings({"reshard": True}, "flow", ("ddp", "fsdp"), enabled=False)
    assert read_settings({"strategy": "fsdp", "reshard_after_forward": False}, "flow", ("ddp", "fsdp"),
                         enabled=True) == ("fsdp", 1, False)


def test_flow_task_counts_the_widths_of_a_step(tmp_path):
    plain = build_task(TrainConfig.from_dict(flow_config(tmp_path, "a", 1)), torch.device("cpu"))
    assert plain.widths_per_step == 1
    elastic = build_task(TrainConfig.from_dict(flow_config(tmp_path, "b", 1, model={"preset": "nano-elastic"},
                                                           elastic={"num_random": 1})), torch.device("cpu"))
    assert elastic.widths_per_step == 3  # full + smallest (tiny) + 1 random (small)


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("reshard_blocks", [True, False])
def test_fully_shard_computes_blocks_in_bf16_and_keeps_fp32_masters(one_rank_group, reshard_blocks):
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = perturb_(ThreeStageDiT(nano()))
    x, t, text, mask = dummy_inputs(model.config, B=2, h=8, w=8)
    settings = shard_modules({"transformer": model}, 1, "cpu", mixed_precision_policy("bf16"),
                             reshard_after_forward("auto", 1 if reshard_blocks else 3))
    assert settings == {"param_dtype": "bfloat16", "reduce_dtype": "float32",
                        "reshard_after_forward": {"roots": False, "blocks": reshard_blocks}}
    seen = []
    blocks = [m for m in model.modules() if isinstance(m, DiTBlock)]
    for b in blocks:  # inside a block's forward its parameters are the gathered ones
        b.mlp.fc1.register_forward_hook(lambda mod, args, out: seen.append((mod.weight.dtype, args[0].dtype,
                                                                            out.dtype)))
    out = model(x, t, {"text": text, "text_mask": mask})
    assert len(seen) == len(blocks) == 4
    assert all(s == (torch.bfloat16,) * 3 for s in seen)             # gathered in bf16, computed in bf16
    assert out.dtype == torch.float32                                # the root's output: fp32 for the loss
    # after forward a resharded block holds its DTensor shards again, a kept one its gathered tensors
    assert all(isinstance(b.modulation, DTensor) == reshard_blocks for b in blocks)
    out.square().mean().backward()
    for p in model.parameters():  # fp32 master parameters and fp32 (reduced) gradients, sharded
        assert isinstance(p, DTensor) and p.dtype == torch.float32 and p.grad.dtype == torch.float32


def _optimizer_tensors(trainer):
    return {f"{i}.{k}": v.clone() for i, p in enumerate(trainer.optimizer.param_groups[0]["params"])
            for k, v in trainer.optimizer.state[p].items()}


@pytest.fixture
def no_plots(monkeypatch):
    """loss.png (matplotlib) is most of a tiny run's time and not what these tests check."""
    monkeypatch.setattr(Trainer, "_plot", lambda self: None)


def test_sharded_checkpoint_resumes_exactly_in_one_process(tmp_path, no_plots):
    """A DCP checkpoint (get/set_optimizer_state_dict) written at step 1 and resumed continues bit-exactly like
    the uninterrupted run; the elastic model leaves a width unsampled, so some parameters had no gradient yet
    (their AdamW state must be saved and restored as AdamW's initial one)."""
    extra = {"model": {"preset": "nano-elastic"}, "elastic": {"num_random": 0}, "ckpt_every": 100}
    whole = Trainer(TrainConfig.from_dict(flow_config(tmp_path, "whole", 3, **extra)), progress=False)
    whole.fit()
    part = Trainer(TrainConfig.from_dict(flow_config(tmp_path, "part", 1, **extra)), progress=False)
    part.fit()
    unsampled = [p for p in part.params.values() if not part.optimizer.state[p]]
    assert unsampled, "the test needs parameters without a gradient so far (the 'small' width's tables)"
    before = _optimizer_tensors(part)
    assert (save_sharded(part) / "dcp").is_dir()  # replaces the step-1 checkpoint
    cont = Trainer(TrainConfig.from_dict(flow_config(tmp_path, "part", 3, **extra)), progress=False)
    cont.task.prepare(cont.run_dir)
    assert cont.resume() and cont.step == 1
    after = _optimizer_tensors(cont)
    assert before.keys() <= after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    cont.step = 0  # fit() resumes again by itself
    cont.fit()
    assert losses(tmp_path / "part") == losses(tmp_path / "whole")
    for k, p in whole.params.items():
        assert torch.equal(cont.params[k], p), k


def test_sharded_checkpoint_of_the_earlier_layout_loads_and_a_foreign_one_is_a_clear_error(tmp_path, no_plots):
    import torch.distributed.checkpoint as dcp

    t = Trainer(TrainConfig.from_dict(flow_config(tmp_path, "r", 2)), progress=False)
    t.fit()
    # what save_dcp wrote before get_optimizer_state_dict: AdamW state keyed by the trainer's parameter names
    dcp.save({"model": dict(t.params), "ema": dict(t.ema),
              "optim": {n: t.optimizer.state[p] for n, p in t.params.items()}}, checkpoint_id=str(tmp_path / "old"))
    fresh = Trainer(TrainConfig.from_dict(flow_config(tmp_path, "r2", 2)), progress=False)
    load_dcp(tmp_path / "old", fresh.modules, fresh.params, fresh.ema, fresh.optimizer)
    assert _optimizer_tensors(fresh).keys() == _optimizer_tensors(t).keys()
    assert all(torch.equal(a, b) for a, b in zip(_optimizer_tensors(fresh).values(), _optimizer_tensors(t).values()))
    assert all(torch.equal(fresh.params[k], p) for k, p in t.params.items())
    other = Trainer(TrainConfig.from_dict(flow_config(tmp_path, "r3", 2, model={"preset": "nano-elastic"})),
                    progress=False)
    with pytest.raises(ValueError, match="does not fit this run's model and optimizer.*new run_dir"):
        load_dcp(tmp_path / "old", other.modules, other.params, other.ema, other.optimizer)
