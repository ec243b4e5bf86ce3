"""The task registry: ``task:`` in a run config names one of these.

::

    @register_task("flow", kind="train", methods=("kd",))
    class FlowTask(Task): ...

    build_task(cfg, device)          # TASKS.get(cfg.task)(cfg, device)
    task_kind("kdmd")                # "distill"
    distill_methods()                # ["dmd", "kd", "kdmd"]: the choices of ``snapgen distill``
    distill_method(cfg)              # which of them a config runs (None for plain training)

``kind`` is ``"train"`` (trains a model from data) or ``"distill"`` (distils a trained one). ``methods`` are the
``snapgen distill`` methods a train task also runs, depending on its config (``flow`` with a ``kd:`` section
is knowledge distillation).
"""

from __future__ import annotations

from ..registry import Registry

__all__ = ["TASKS", "register_task", "build_task", "task_kind", "task_names", "distill_methods", "distill_method"]

TASKS: Registry[type] = Registry("task")
KINDS = ("train", "distill")


def register_task(name: str, kind: str = "train", methods: tuple[str, ...] = ()):
    if kind not in KINDS:
        raise ValueError(f"task kind must be one of {KINDS}, got {kind!r}")

    def add(cls):
        cls.kind = kind
        if not getattr(cls, "name", ""):
            cls.name = name
        TASKS.register(name, cls, kind=kind, methods=tuple(methods) + ((name,) if kind == "distill" else ()))
        return cls

    return add


def task_names() -> list[str]:
    return TASKS.names()


def task_kind(name: str) -> str:
    return TASKS.meta(name)["kind"]


def build_task(cfg, device, **kwargs):
    """The task ``cfg.task`` for run config ``cfg`` on ``device``; ``kwargs`` go to its constructor (e.g. a
    ``text_encoder`` object for the flow task)."""
    return TASKS.get(cfg.task)(cfg, device, **kwargs)


def distill_methods() -> list[str]:
    return sorted({m for n in TASKS.names() for m in TASKS.meta(n)["methods"]})


def distill_method(cfg) -> str | None:
    """The ``snapgen distill`` method config ``cfg`` runs, or None."""
    return TASKS.get(cfg.task).distill_method(cfg)
