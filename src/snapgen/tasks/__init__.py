"""What is trained: the Task protocol (:mod:`.base`), the task registry (:mod:`.registry`) and every task.

==============  ========  ==========================================================================
task            kind      what
==============  ========  ==========================================================================
``autoencoder`` train     the small VAE on images (:mod:`.autoencoder`)
``flow``        train     the text-to-image DiT by flow matching; with ``kd:``, knowledge distillation
``dmd``         distill   DMD2 step distillation of a trained pipeline (:mod:`.dmd`)
``kdmd``        distill   K-DMD: DMD2 + a few-step teacher's knowledge (SnapGen++ Sec. 3.2)
==============  ========  ==========================================================================

Layering: tasks use models, data, flow, distill (the loss cores) and pipelines, and never import
:mod:`snapgen.train`, which runs them. Importing this package registers every task.
"""

from .base import ROLES, ParamGroup, RunConfig, StepGenerator, Task, check_keys, module_roles, param_groups
from .registry import TASKS, build_task, distill_method, distill_methods, register_task, task_kind, task_names
from . import autoencoder, dmd, flow  # noqa: E402,F401  (register the tasks)
from .autoencoder import AutoencoderTask, psnr
from .dmd import DistillTask
from .flow import FlowTask
from .validation import validation_loss

__all__ = ["ROLES", "ParamGroup", "RunConfig", "StepGenerator", "Task", "check_keys", "module_roles", "param_groups",
           "TASKS", "build_task", "distill_method", "distill_methods", "register_task", "task_kind", "task_names",
           "AutoencoderTask", "DistillTask", "FlowTask", "psnr", "validation_loss"]
