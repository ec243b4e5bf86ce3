"""Helpers the ``snapgen`` commands share: prompts, model configs, resolutions, image output.

Only light imports at module level, so that ``snapgen --help`` stays fast; the library is imported inside.
"""

from __future__ import annotations

import os
from pathlib import Path

CLI_RESOLUTION_ERROR = "resolution must be N or HxW in pixels, e.g. 64 or 64x96; got {!r}"


def parse_resolution(text: str) -> tuple[int, int]:
    """``--resolution`` of export / bench / select: ``"64"`` -> (64, 64), ``"64x96"`` -> (64, 96)."""
    from ..utils.resolution import parse_resolution as parse

    return parse(text, error=CLI_RESOLUTION_ERROR)


def add_device_args(p) -> None:
    """``--device`` / ``--dtype`` of the commands that run a PyTorch pipeline (generate, eval)."""
    p.add_argument("--device", help="where the model runs: auto (default: cuda if a GPU is visible, else cpu), cpu, "
                                    "cuda, cuda:N, mps")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="weights and activations (default fp32; bf16/fp16 are for GPUs: slow on CPUs)")


def pipeline_placement(args) -> tuple:
    """``(device, dtype)`` from ``--device`` / ``--dtype``, checked (a missing GPU is a clear error)."""
    from ..utils.device import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cpu" and dtype is not __import__("torch").float32:
        print(f"note: --dtype {args.dtype} on the CPU is slow here (no fast half-precision CPU matmul); "
              f"fp32 is the CPU default")
    return device, dtype


def read_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    """The positional prompts plus the non-empty, non-``#`` lines of ``prompts_file``; at least one."""
    prompts = list(prompts or [])
    if prompts_file:
        if not os.path.isfile(prompts_file):
            raise FileNotFoundError(f"prompts file not found: {prompts_file}")
        with open(prompts_file) as f:
            prompts += [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError("no prompt given: snapgen generate \"a red circle to the left of a blue square\" "
                         "(or --prompts-file FILE with one prompt per line)")
    return prompts


def load_model_config(preset: str, config: str | None):
    """``(model config, label)``: from ``config`` (a config.json of any registered family; label None) or the
    named preset (bare or ``namespace/name``, resolved by the model registry)."""
    from pathlib import Path

    from ..models.registry import resolve_config, saved_class

    if config:
        return saved_class(Path(config).parent, Path(config).name)[1], None
    return resolve_config(preset)[1], preset.rsplit("/", 1)[-1]


def variant_grid(per_variant: list[list], prompts: list[str], names: list[str]) -> tuple[list, list[str]]:
    """Images of every prompt from every variant -> (images, captions) of a grid with one row per prompt and
    one column per variant; ``per_variant[j][i]`` is prompt ``i`` from variant ``names[j]``."""
    images = [per_variant[j][i] for i in range(len(prompts)) for j in range(len(names))]
    captions = [f"{names[j]}: {prompts[i]}" for i in range(len(prompts)) for j in range(len(names))]
    return images, captions


def write_images(images: list, captions: list[str], out: str | os.PathLike, *, grid: bool, cols: int | None,
                 scale: int) -> list[Path]:
    """Save ``images`` to ``out`` and return the files written.

    ``out`` with a suffix is one file: the first image, or the grid of all with ``grid`` (more than one
    caption without ``grid`` is an error). Otherwise ``out`` is a folder: ``NN_<caption slug>.png`` per image,
    plus ``grid.png`` with ``grid``.
    """
    from ..utils.images import make_grid

    out = Path(out)
    written = []
    if out.suffix:  # a file: one image, or the grid of all
        if len(captions) > 1 and not grid:
            raise ValueError(f"{len(captions)} prompts need --out to be a folder (got {out}) or --grid")
        out.parent.mkdir(parents=True, exist_ok=True)
        (make_grid(images, captions, cols=cols, scale=scale, caption_height=40) if grid else images[0]).save(out)
        written.append(out)
    else:  # a folder: one PNG per prompt (+ grid.png with --grid)
        out.mkdir(parents=True, exist_ok=True)
        for i, (im, p) in enumerate(zip(images, captions)):
            slug = "".join(c if c.isalnum() else "_" for c in p.lower())[:48].strip("_")
            target = out / f"{i:02d}_{slug}.png"
            im.save(target)
            written.append(target)
        if grid:
            make_grid(images, captions, cols=cols, scale=scale, caption_height=40).save(out / "grid.png")
            written.append(out / "grid.png")
    return written
