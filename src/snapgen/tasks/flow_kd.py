"""Knowledge distillation in the flow task (SnapGen++ Sec. 3.1; the losses are :mod:`snapgen.distill.kd`):
a frozen teacher (:mod:`snapgen.tasks.teachers`: a snapgen pipeline folder, or an external diffusers
transformer with its own text encoders), one learned feature projector per student width (trained, not
exported)."""

from __future__ import annotations

import torch

from .base import check_keys

__all__ = ["FlowKD"]


class FlowKD:
    """The flow task's ``kd:`` section (mixed into :class:`snapgen.tasks.flow.FlowTask`)."""

    kd = None
    kd_teacher = None

    def _init_kd(self, kd: dict) -> None:
        """Knowledge distillation from a frozen teacher (SnapGen++ Sec. 3.1; snapgen.distill.kd)."""
        from ..distill.kd import KnowledgeDistillationLoss
        from .teachers import build_teacher

        check_keys("kd", kd, {"teacher", "scaling", "out_weight", "feat_weight"})
        if "teacher" not in kd:
            raise ValueError("kd needs 'teacher': a trained pipeline folder, or {kind: diffusers, path: ...}")
        mcfg = self.model.config
        self.kd_teacher = build_teacher(kd["teacher"], self.device, where="kd.teacher",
                                        encoder_dims=self.cond_kwargs["encoder_dims"],
                                        student_channels=mcfg.in_channels, student_patch=mcfg.patch_size,
                                        student_vae=self.cfg.vae.get("path"))
        tw = self.kd_teacher.feature_width
        projectors = {name: torch.nn.Linear(int(mcfg.width * r), tw) for name, r in self.model.variants.items()}
        self.kd = KnowledgeDistillationLoss(self.kd_teacher, projectors, kd.get("scaling", "snapgen"),
                                            float(kd.get("out_weight", 1.0)), float(kd.get("feat_weight", 1.0)),
                                            self.objective.mean, self.objective.std).to(self.device)

    def _kd_prepare(self, captions: list[str]) -> None:
        """The data's distinct captions, for a teacher with its own text encoder (encoded once)."""
        if self.kd_teacher is not None and self.kd_teacher.needs_captions:
            self.kd_teacher.prepare_captions(captions)

    def _kd_loss(self, step: int, x0, feats, drops, t, eps, captions=None):
        from ..flow import loss_per_time_bin
        from ..flow.objective import interpolate, velocity_target

        if drops is None:
            drops = [torch.zeros(x0.shape[0], dtype=torch.bool, device=self.device)] * len(feats)
        text, mask = self.conditioning(feats, drop=drops)
        t_cond = self.kd_teacher.condition(captions, feats, drops)  # the teacher sees the same dropped captions
        x_t, target = interpolate(x0, eps, t), velocity_target(x0, eps).float()
        v_t, f_t = self.kd.teacher_targets(x_t, t, t_cond)
        widths = ["full"]
        if self.elastic_loss is not None:
            from ..elastic.training import sample_subnetworks

            widths += sample_subnetworks(self.model.variants, step, self.cfg.seed, self.elastic_loss.num_random)
        total, logs, per_sample = 0.0, {}, None
        shift = self.objective.shift_for(x0)  # the shift ``t`` was drawn with (FlowTask's batch sampler)
        try:
            for name in widths:
                self.model.set_variant(name)
                v, f = self.model(x_t, t, {"text": text, "text_mask": mask}, features=("last",))
                f = f["last"]
                loss, parts = self.kd.per_width(name, v, f, target, v_t, f_t, t, shift)
                total = total + loss
                logs.update({f"{k}_{name}": val for k, val in parts.items()})
                if per_sample is None:
                    per_sample = torch.nn.functional.mse_loss(v.detach().float(), target, reduction="none").flatten(1).mean(1)
        finally:
            self.model.set_variant("full")
        return total, {"bins": loss_per_time_bin(per_sample, t, self.cfg.time_bins), **logs}
