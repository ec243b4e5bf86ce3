"""The critic's training times (issue 21 §1): ``critic_times="tau"`` draws them like the DMD term's tau
(U[tau_low, tau_high], then time-shifted), so the critic is trained at the noise levels where the DMD term
queries it; ``"uniform"`` (the default) keeps DMD2's unshifted U[0, 1]. Unit level (KDMDLoss on the 2-D toy) and task level
(``distill.critic_times`` in a dmd / kdmd config)."""

import copy

import pytest
import torch
from helpers.runs import distill_config

from snapgen.distill.dmd import critic_loss, sample_tau
from snapgen.distill.kdmd import KDMDConfig, KDMDLoss
from snapgen.distill.toy import ToyVelocity
from snapgen.sampling.euler import shift_time
from snapgen.train import Trainer

QUANTILES = torch.linspace(0.05, 0.95, 19)


class Recorder(torch.nn.Module):
    """Wraps a model and records the times of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.times = model, []

    def forward(self, x, t, cond=None, **kw):
        self.times.append(t.detach().clone())
        return self.model(x, t, cond, **kw)


def _critic_train_times(critic_times: str, n: int = 8192) -> torch.Tensor:
    """The times at which KDMDLoss trains its critic on a critic-only turn (step 1, gen_every 2)."""
    torch.manual_seed(0)
    teacher = ToyVelocity(hidden=16).requires_grad_(False)
    critic = Recorder(copy.deepcopy(teacher))
    obj = KDMDLoss(KDMDConfig(gen_every=2, shift=3.0, critic_times=critic_times), copy.deepcopy(teacher), critic,
                   teacher)
    obj(1, {}, None, (n, 2), torch.Generator().manual_seed(7))
    assert len(critic.times) == 1  # critic-only turn: the critic is called by its loss alone
    return critic.times[0]


def test_critic_loss_draws_its_times_exactly_like_sample_tau():
    seen = []
    critic = lambda x, t, cond: seen.append(t) or 0 * x  # noqa: E731
    x0 = torch.zeros(64, 2)
    critic_loss(critic, x0, {}, torch.Generator().manual_seed(3), 0.02, 0.98, 3.0)
    torch.testing.assert_close(seen[-1], sample_tau(64, 0.02, 0.98, 3.0, torch.Generator().manual_seed(3)),
                               rtol=0, atol=0)
    # the defaults are DMD2's uniform times (the draws of the code before issue 21)
    critic_loss(critic, x0, {}, torch.Generator().manual_seed(3))
    old = torch.rand(64, generator=torch.Generator().manual_seed(3)).clamp(1e-5, 1 - 1e-5)
    torch.testing.assert_close(seen[-1], old, rtol=0, atol=0)


def test_kdmd_critic_times_follow_the_tau_distribution_when_asked():
    assert KDMDConfig().critic_times == "uniform"  # DMD2's default (the toy measured tau neutral-to-worse)
    tau = sample_tau(8192, 0.02, 0.98, 3.0, torch.Generator().manual_seed(11))
    q_tau = torch.quantile(tau, QUANTILES)
    q_crit = torch.quantile(_critic_train_times("tau"), QUANTILES)
    q_uni = torch.quantile(_critic_train_times("uniform"), QUANTILES)
    # independent draws of one distribution: quantiles within sampling noise (std <= ~0.01 at n = 8192)
    assert (q_crit - q_tau).abs().max() < 0.04, (q_crit, q_tau)
    # DMD2's uniform times are a different distribution at shift 3 (median 0.5 vs 0.75)
    assert (q_uni - q_tau).abs().max() > 0.2, (q_uni, q_tau)
    assert (q_uni - QUANTILES).abs().max() < 0.03


def test_critic_times_rejects_unknown_values():
    with pytest.raises(ValueError, match="critic_times"):
        KDMDConfig(critic_times="shifted")
    assert KDMDConfig(critic_times="uniform").critic_time_range() == (0.0, 1.0, 1.0)
    assert KDMDConfig().critic_time_range() == (0.0, 1.0, 1.0)   # the default: DMD2's uniform times
    assert KDMDConfig(shift=2.0, tau_low=0.1, tau_high=0.9, critic_times="tau").critic_time_range() == (0.1, 0.9, 2.0)


def _task_critic_times(tmp_path, base, run, **distill):
    trainer = Trainer(distill_config(tmp_path, base, "dmd", run, 2, variants=["tiny"], **distill), progress=False)
    task = trainer.task
    task.prepare(trainer.run_dir)
    obj = task.losses["tiny"]
    obj.critic = Recorder(obj.critic)
    task.loss(1)  # gen_every 2: step 1 is a critic-only turn
    assert len(obj.critic.times) == 1
    return task, obj.critic.times[0]


def test_the_config_switch_reaches_the_task(tmp_path, base):
    task, t_tau = _task_critic_times(tmp_path, base, "tau", tau=[0.1, 0.9], critic_times="tau")
    assert task.kcfg.critic_times == "tau" and task.kcfg.shift == 3.0
    task, t_uni = _task_critic_times(tmp_path, base, "uniform", tau=[0.1, 0.9])  # the default
    assert task.kcfg.critic_times == "uniform"
    # the same seeded draw, shaped by the switch: tau mode = uniform mode's draw mapped like sample_tau
    assert not torch.allclose(t_tau, t_uni)
    torch.testing.assert_close(t_tau, shift_time(t_uni * 0.8 + 0.1, 3.0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("task", ["dmd", "kdmd"])
def test_a_bad_critic_times_is_a_one_line_config_error(tmp_path, base, task):
    with pytest.raises(ValueError, match=r"distill\.critic_times must be one of \['tau', 'uniform'\]") as e:
        Trainer(distill_config(tmp_path, base, task, "bad", 2, variants=["tiny"], critic_times="shifted"),
                progress=False)
    assert "\n" not in str(e.value)
