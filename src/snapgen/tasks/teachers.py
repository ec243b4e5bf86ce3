"""Teachers from a run configuration (``kd.teacher`` of the flow task, ``distill.teacher`` /
``distill.few_step_teacher`` of the dmd tasks): :mod:`snapgen.distill.teacher` and
:mod:`snapgen.distill.diffusers_teacher`, validated here.

A teacher is one of

* a string: a snapgen pipeline folder (the same text encoder as the student: it reads the student encoder's
  cached features through its own trained text conditioning);
* ``{kind: snapgen, path: <pipeline folder>}``: the same, spelled out;
* ``{kind: diffusers, path: <diffusers pipeline folder>, ...}``: an external SD3/SD3.5, Flux or Qwen-Image
  transformer with its own text encoders. Keys: ``path`` (a folder with ``transformer/``, ``text_encoder/``,
  ``tokenizer/``...), or/and the component folders ``transformer``, ``text_encoder``, ``tokenizer``,
  ``text_encoder_2``, ``tokenizer_2``, ``text_encoder_3``, ``tokenizer_3`` (these win over ``path``);
  ``vae`` (the teacher's VAE folder, default ``<path>/vae``: checked against the student's); ``dtype``
  (``float32`` / ``bfloat16`` / ``float16``); ``feature_tap`` (module path of the block whose image tokens are
  the feature target, default the last block); ``negative_prompt``, ``max_sequence_length``, ``cfg_renorm``,
  ``guidance`` (Flux-dev's embedded guidance).

Latent space: the student must denoise the teacher's latents (velocities are compared in one space), so the
channel counts must match and, where both VAE folders are known, their configs must be equal (weights are
not compared).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .base import check_keys

__all__ = ["build_teacher", "check_latent_space"]

_DIFFUSERS_KEYS = {"kind", "path", "transformer", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                   "text_encoder_3", "tokenizer_3", "vae", "dtype", "feature_tap", "negative_prompt",
                   "max_sequence_length", "cfg_renorm", "guidance"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _vae_config(folder: Path) -> dict | None:
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return None
    return {k: v for k, v in json.loads(cfg.read_text()).items() if not k.startswith("_") or k == "_class_name"}


def check_latent_space(teacher, student_channels: int, student_vae=None, teacher_vae=None,
                       where: str = "teacher") -> None:
    """The student must work in the teacher's latent space: same channels; same VAE config where both are
    known. Errors say which VAE to encode the data with."""
    fix = (f"encode the training data with the teacher's VAE ({teacher_vae})" if teacher_vae
           else "encode the training data with the teacher's VAE")
    if int(teacher.latent_channels) != int(student_channels):
        raise ValueError(f"{where} denoises {teacher.latent_channels}-channel latents but the student takes "
                         f"{student_channels}: KD compares velocities in one latent space; {fix} and give the "
                         f"student in_channels={teacher.latent_channels}")
    if student_vae is None or teacher_vae is None:
        return
    a, b = _vae_config(student_vae), _vae_config(teacher_vae)
    if a is None or b is None:
        return
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        raise ValueError(f"{where}'s VAE {teacher_vae} differs from the student's VAE {student_vae} in {diff}: "
                         f"KD compares velocities in one latent space; {fix}")


def build_teacher(spec, device: torch.device, *, where: str, encoder_dims: list[int] | None,
                  student_channels: int, student_patch: int, student_vae=None):
    """A :class:`snapgen.distill.teacher.Teacher` on ``device`` (frozen) from a config value (module docstring)."""
    from ..distill.teacher import SnapgenTeacher

    if isinstance(spec, (str, Path)):
        spec = {"kind": "snapgen", "path": str(spec)}
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a snapgen pipeline folder or a mapping with 'kind' (snapgen | diffusers), "
                         f"got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind == "snapgen":
        from ..pipelines import TextToImagePipeline

        check_keys(where, spec, {"kind", "path"})
        if not spec.get("path"):
            raise ValueError(f"{where} needs 'path': a trained snapgen pipeline folder")
        pipe = TextToImagePipeline.from_pretrained(spec["path"])
        if encoder_dims is not None and list(pipe.conditioning.encoder_dims) != list(encoder_dims):
            raise ValueError(f"kd teacher {spec['path']} reads text features of widths "
                             f"{pipe.conditioning.encoder_dims}, this run {encoder_dims}: teacher and student must "
                             f"use the same text encoder (or use a teacher of kind: diffusers with its own)")
        model = pipe.transformer.to(device).eval().requires_grad_(False)
        model.set_variant("full")
        conditioning = pipe.conditioning.to(device).eval().requires_grad_(False)
        teacher = SnapgenTeacher(model, conditioning, variant="full", feature_patch=student_patch)
        check_latent_space(teacher, student_channels, student_vae, Path(spec["path"]) / "vae", where)
        return teacher
    if kind != "diffusers":
        raise ValueError(f"{where}.kind must be 'snapgen' or 'diffusers', got {kind!r}")
    from ..distill.diffusers_teacher import DiffusersTeacher

    check_keys(where, spec, _DIFFUSERS_KEYS)
    if not spec.get("path") and not spec.get("transformer"):
        raise ValueError(f"{where} (kind: diffusers) needs 'path' (a diffusers pipeline folder) or 'transformer' "
                         f"and the text encoder/tokenizer folders")
    dtype = spec.get("dtype", "float32")
    if dtype not in _DTYPES:
        raise ValueError(f"{where}.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    kw = {k: spec[k] for k in _DIFFUSERS_KEYS - {"kind", "path", "vae", "dtype"} if spec.get(k) is not None}
    teacher = DiffusersTeacher.from_pretrained(spec.get("path"), dtype=_DTYPES[dtype], feature_patch=student_patch,
                                               name=where, **kw).to(device)
    vae = spec.get("vae") or (Path(spec["path"]) / "vae" if spec.get("path") else None)
    if vae is not None and not Path(vae).is_dir():
        if spec.get("vae"):
            raise FileNotFoundError(f"{where}.vae folder {vae} does not exist")
        vae = None
    check_latent_space(teacher, student_channels, student_vae, vae, where)
    return teacher
