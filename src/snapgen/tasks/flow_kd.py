"""Knowledge distillation in the flow task (SnapGen++ Sec. 3.1; the losses are :mod:`snapgen.distill.kd`):
a frozen teacher pipeline, one learned feature projector per student width (trained, not exported)."""

from __future__ import annotations

import torch

from .base import check_keys

__all__ = ["FlowKD"]


class FlowKD:
    """The flow task's ``kd:`` section (mixed into :class:`snapgen.tasks.flow.FlowTask`)."""

    kd = None

    def _init_kd(self, kd: dict) -> None:
        """Knowledge distillation from a frozen teacher pipeline (SnapGen++ Sec. 3.1; snapgen.distill.kd)."""
        from ..distill.kd import KnowledgeDistillationLoss
        from ..pipelines import TextToImagePipeline

        check_keys("kd", kd, {"teacher", "scaling", "out_weight", "feat_weight"})
        if "teacher" not in kd:
            raise ValueError("kd needs 'teacher': a trained pipeline folder")
        teacher = TextToImagePipeline.from_pretrained(kd["teacher"])
        if list(teacher.conditioning.encoder_dims) != list(self.cond_kwargs["encoder_dims"]):
            raise ValueError(f"kd teacher {kd['teacher']} reads text features of widths "
                             f"{teacher.conditioning.encoder_dims}, this run {self.cond_kwargs['encoder_dims']}: "
                             f"teacher and student must use the same text encoder")
        self.kd_teacher = teacher.transformer.to(self.device).eval().requires_grad_(False)
        self.kd_teacher.set_variant("full")
        self.kd_conditioning = teacher.conditioning.to(self.device).eval().requires_grad_(False)
        tw = self.kd_teacher.config.width
        projectors = {name: torch.nn.Linear(int(self.model.config.width * r), tw)
                      for name, r in self.model.variants.items()}
        self.kd = KnowledgeDistillationLoss(self.kd_teacher, projectors, kd.get("scaling", "snapgen"),
                                            float(kd.get("out_weight", 1.0)), float(kd.get("feat_weight", 1.0)),
                                            self.objective.mean, self.objective.std).to(self.device)

    def _kd_loss(self, step: int, x0, feats, drops, t, eps):
        from ..flow import loss_per_time_bin
        from ..flow.objective import interpolate, velocity_target

        if drops is None:
            drops = [torch.zeros(x0.shape[0], dtype=torch.bool, device=self.device)]
        text, mask = self.conditioning([feats], drop=drops)
        t_text, t_mask = self.kd_conditioning([feats], drop=drops)  # the teacher sees the same dropped captions
        x_t, target = interpolate(x0, eps, t), velocity_target(x0, eps).float()
        v_t, f_t = self.kd.teacher_targets(x_t, t, {"text": t_text, "text_mask": t_mask})
        widths = ["full"]
        if self.elastic_loss is not None:
            from ..elastic.training import sample_subnetworks

            widths += sample_subnetworks(self.model.variants, step, self.cfg.seed, self.elastic_loss.num_random)
        total, logs, per_sample = 0.0, {}, None
        try:
            for name in widths:
                self.model.set_variant(name)
                v, f = self.model(x_t, t, {"text": text, "text_mask": mask}, features=("last",))
                f = f["last"]
                loss, parts = self.kd.per_width(name, v, f, target, v_t, f_t, t)
                total = total + loss
                logs.update({f"{k}_{name}": val for k, val in parts.items()})
                if per_sample is None:
                    per_sample = torch.nn.functional.mse_loss(v.detach().float(), target, reduction="none").flatten(1).mean(1)
        finally:
            self.model.set_variant("full")
        return total, {"bins": loss_per_time_bin(per_sample, t, self.cfg.time_bins), **logs}
