"""Critics as adapters on the shared frozen base (issue 21 §1, the paper's "no extra copy"): a LoRA critic's frozen
weights are the base's own tensors, only its adapter is new memory, and training is exactly what a deep-copied
critic gives (the old behaviour); a fully trained critic (critic_lora: null) still gets its own copy."""

import copy

import torch
from helpers.runs import distill_config, losses

import snapgen.tasks.dmd as dmd
from snapgen.train import Trainer


def _storages(module):
    return {p.untyped_storage().data_ptr() for p in (*module.parameters(), *module.buffers())}


def test_shared_view_shares_tensors_not_modules():
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).requires_grad_(False)
    view = dmd.shared_view(layer)
    assert view is not layer and view[0] is not layer[0]
    assert all(a is b for a, b in zip(view.parameters(), layer.parameters()))
    assert all(a is b for a, b in zip(view.buffers(), layer.buffers()))
    view.add_module("extra", torch.nn.Linear(2, 2))   # changes to the view's structure stay in the view
    assert not hasattr(layer, "extra")


def test_lora_critics_hold_no_copy_of_the_base(tmp_path, base):
    trainer = Trainer(distill_config(tmp_path, base, "dmd", "run", 2, variants=["tiny", "full"]), progress=False)
    task = trainer.task
    base_storages = _storages(task.base)
    for v, critic in task.critics.items():
        own = {p.untyped_storage().data_ptr() for n, p in critic.named_parameters() if ".lora.critic." in n}
        frozen = {p.untyped_storage().data_ptr() for n, p in critic.named_parameters() if ".lora." not in n}
        assert frozen and frozen <= base_storages, v                     # the base's tensors themselves
        assert own and not (own & base_storages), v                      # its adapter is its own
        assert all(p.requires_grad == (".lora.critic." in n) for n, p in critic.named_parameters())
    # memory held by the critics beyond the base: their adapters only (< 1/4 of the base here; was 2 x base)
    extra = sum(p.numel() for c in task.critics.values() for p in c.parameters()
                if p.untyped_storage().data_ptr() not in base_storages)
    assert 0 < extra < sum(p.numel() for p in task.base.parameters()) / 4
    trainer.fit()
    # the frozen base never moved (the critics' optimiser must not reach it)
    ref = Trainer(distill_config(tmp_path, base, "dmd", "ref", 2, variants=["tiny", "full"]), progress=False).task
    for (n, a), (_, b) in zip(task.base.named_parameters(), ref.base.named_parameters()):
        if ".lora." not in n:
            assert torch.equal(a, b), n


def test_training_equals_deep_copied_critics(tmp_path, base, monkeypatch):
    Trainer(distill_config(tmp_path, base, "dmd", "shared", 4, variants=["tiny"]), progress=False).fit()
    monkeypatch.setattr(dmd, "shared_view", copy.deepcopy)   # the behaviour before: a full copy per critic
    Trainer(distill_config(tmp_path, base, "dmd", "copied", 4, variants=["tiny"]), progress=False).fit()
    assert losses(tmp_path / "shared") == losses(tmp_path / "copied")


def test_fully_trained_critic_is_a_copy(tmp_path, base):
    task = Trainer(distill_config(tmp_path, base, "dmd", "full", 2, variants=["tiny"], critic_lora=None),
                   progress=False).task
    critic = task.critics["tiny"]
    assert not (_storages(critic) & _storages(task.base))
    assert all(p.requires_grad for p in critic.parameters())
