"""The Task protocol and registry, per-group optimizer settings and clipping, EMA by role, and data-parallel
DMD pieces (BatchDraws, gradient accumulation == the big batch). Two torchrun ranks: test_distributed.py."""

import pytest
import torch
from helpers.runs import distill_config, losses, weights

from snapgen.distill.dmd import BatchDraws, backward_simulate, critic_loss, sample_tau
from snapgen.flow import sampling_times
from snapgen.tasks import TASKS, ParamGroup, Task, build_task, distill_method, distill_methods, task_kind
from snapgen.train import Trainer
from snapgen.train.config import TrainConfig


def test_registry_lists_every_task_with_its_kind():
    assert TASKS.names() == ["autoencoder", "dmd", "flow", "kdmd"]
    assert [task_kind(n) for n in TASKS.names()] == ["train", "distill", "train", "distill"]
    assert distill_methods() == ["dmd", "kd", "kdmd"]
    assert distill_method(TrainConfig(task="flow")) is None
    assert distill_method(TrainConfig(task="flow", kd={"teacher": "x"})) == "kd"
    assert distill_method(TrainConfig(task="kdmd")) == "kdmd"
    with pytest.raises(ValueError, match="task must be one of autoencoder, dmd, flow, kdmd"):
        TrainConfig(task="gan")
    with pytest.raises(KeyError, match="unknown task 'gan'"):
        build_task(type("C", (), {"task": "gan"})(), "cpu")


# --- the trainer with a toy task: parameter groups, per-group clipping, EMA by role ------------------------
class TwoGroups(Task):
    """``a`` (exported, averaged) and ``b`` (trained only), each a Linear, one loss over both."""

    def __init__(self, cfg, device="cpu"):
        self.cfg = cfg
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)

    def modules(self):
        return {"a": (self.a, frozenset({"trained", "ema", "exported"})), "b": (self.b, frozenset({"trained"}))}

    def param_groups(self):
        return [ParamGroup("ga", ("a",), clip=0.01), ParamGroup("gb", ("b",), lr_scale=0.5, betas=(0.0, 0.9))]

    def loss(self, step, part=0):
        x = torch.arange(6.0).view(2, 3) + step
        return (self.a(x) * 10).pow(2).mean() + (self.b(x) * 10).pow(2).mean(), {}

    def export(self, out_dir):
        return out_dir


def toy_cfg(tmp_path, **optim):
    return TrainConfig.from_dict({"task": "flow", "run_dir": str(tmp_path / "toy"), "steps": 1, "threads": 1,
                                  "optim": {"lr": 0.1, "warmup": 0, "grad_clip": 1.0, **optim},
                                  "log_every": 1, "sample_every": 0})


def manual_step(task, cfg_optim, clip_a, clip_b):
    """One step by hand: AdamW per group (lr 0.1 / 0.05, betas), each group clipped by its own norm."""
    ref = TwoGroups(None)
    loss, _ = ref.loss(0)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(ref.a.parameters()), clip_a)
    torch.nn.utils.clip_grad_norm_(list(ref.b.parameters()), clip_b)
    groups = [{"params": [ref.a.weight], "weight_decay": cfg_optim.weight_decay, "lr": 0.1},
              {"params": [ref.a.bias], "weight_decay": 0.0, "lr": 0.1},
              {"params": [ref.b.weight], "weight_decay": cfg_optim.weight_decay, "lr": 0.05, "betas": (0.0, 0.9)},
              {"params": [ref.b.bias], "weight_decay": 0.0, "lr": 0.05, "betas": (0.0, 0.9)}]
    torch.optim.AdamW(groups, betas=cfg_optim.betas, eps=cfg_optim.eps).step()
    return ref


def test_param_groups_have_their_own_lr_betas_and_clip(tmp_path):
    cfg = toy_cfg(tmp_path)
    t = Trainer(cfg, task=TwoGroups(cfg), progress=False)
    assert [g["group"] for g in t.optimizer.param_groups] == ["ga", "ga", "gb", "gb"]
    assert sorted(t.ema) == ["a.bias", "a.weight"]  # b is trained, not averaged
    t.fit()
    ref = manual_step(None, cfg.optim, 0.01, 1.0)
    for name in ("a", "b"):
        for p, q in zip(getattr(t.task, name).parameters(), getattr(ref, name).parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
    rec = losses(tmp_path / "toy")
    assert list(rec) == [1]


def test_optim_groups_override_and_the_global_clip_mode(tmp_path):
    cfg = toy_cfg(tmp_path, groups={"ga": {"clip": 0.5}, "gb": {"clip": 0.02}})
    t = Trainer(cfg, task=TwoGroups(cfg), progress=False)
    t.fit()
    ref = manual_step(None, cfg.optim, 0.5, 0.02)
    torch.testing.assert_close(t.task.b.weight, ref.b.weight, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match=r"optim.groups names \['critic'\]"):
        c = toy_cfg(tmp_path, groups={"critic": {"clip": 1.0}})
        Trainer(c, task=TwoGroups(c), progress=False)
    with pytest.raises(ValueError, match=r"unknown keys in 'optim.groups.ga'"):
        c = toy_cfg(tmp_path, groups={"ga": {"clipp": 1.0}})
        Trainer(c, task=TwoGroups(c), progress=False)
    # global: both groups clipped together by their joint norm (the pre-group behaviour)
    g = toy_cfg(tmp_path, clip_mode="global", grad_clip=0.01)
    g.run_dir = str(tmp_path / "global")
    t = Trainer(g, task=TwoGroups(g), progress=False)
    t.task.loss(0)[0].backward()
    from snapgen.train.optim import clip_gradients

    norms = clip_gradients(t.group_states, g.optim)
    assert norms["grad_norm"] ** 2 == pytest.approx(norms["grad_norm_ga"] ** 2 + norms["grad_norm_gb"] ** 2)
    joint = torch.nn.utils.get_total_norm([p.grad for p in t.params.values()])
    assert float(joint) == pytest.approx(0.01, rel=1e-4)


# --- DMD: the draws of a split batch are the draws of the whole batch ------------------------------------------
def test_batch_draws_split_a_batch_exactly():
    times = sampling_times(4, 3.0)
    velocity = lambda x, t: 0.3 * x + t.view(-1, 1, 1, 1)  # noqa: E731
    critic = lambda x, t, cond: 0.5 * x  # noqa: E731

    def run(gen, B):
        noise = gen.randn((B, 2, 3, 3)) if isinstance(gen, BatchDraws) else torch.randn((B, 2, 3, 3), generator=gen)
        x = backward_simulate(velocity, noise, times, 3, gen)
        return x, sample_tau(B, shift=3.0, generator=gen), critic_loss(critic, x, {}, gen)

    plain = run(torch.Generator().manual_seed(5), 6)
    whole = run(BatchDraws(torch.Generator().manual_seed(5), 6), 6)  # all rows: exactly the plain draws
    assert all(torch.equal(a, b) for a, b in zip(plain, whole))
    parts = []
    for p in range(3):
        parts.append(run(BatchDraws(torch.Generator().manual_seed(5), 6, slice(2 * p, 2 * p + 2)), 2))
    torch.testing.assert_close(torch.cat([q[0] for q in parts]), plain[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat([q[1] for q in parts]), plain[1], rtol=0, atol=0)
    torch.testing.assert_close(sum(q[2] for q in parts) / 3, plain[2], rtol=1e-5, atol=0)


def test_dmd_gradient_accumulation_equals_the_big_batch(tmp_path, base):  # noqa: F811

    big = distill_config(tmp_path, base, "dmd", "big", 3, variants=["tiny"])
    t = Trainer(big, progress=False)
    assert [g.name for g in t.groups] == ["generator", "critic"]
    assert all(k.startswith("transformer.") for k in t.ema)  # critics are not averaged
    t.fit()
    acc = distill_config(tmp_path, base, "dmd", "acc", 3, variants=["tiny"])
    acc = TrainConfig.from_dict({**acc.to_dict(), "batch_size": 2, "distributed": {"accumulation": 2}})
    Trainer(acc, progress=False).fit()
    la, lb = losses(tmp_path / "big"), losses(tmp_path / "acc")
    assert la.keys() == lb.keys() and all(abs(la[s] - lb[s]) < 1e-5 for s in la)
    a, b = weights(tmp_path / "big"), weights(tmp_path / "acc")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5, msg=k)
