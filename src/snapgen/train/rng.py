"""The RNG states a training run checkpoints for exact resume (``rng.safetensors``), one function pair used by
both checkpoint formats (:mod:`.checkpoint` and the FSDP/DCP one in :mod:`.sharded`).

Keys of ``rng.safetensors``:

- ``torch``: the CPU global RNG (``torch.get_rng_state``): dropout and other global draws on CPU. Every rank
  draws the same numbers from it (each draws the global batch's randomness), so rank 0's is stored.
- ``task``: the task's own generator (times, noise, crops). ``Generator.get_state`` works for CPU and CUDA
  generators alike; the tasks build CPU generators (``snapgen.utils.random`` moves their draws).
- ``cuda.<r>``: the CUDA global RNG of the device rank ``r`` trains on (``torch.cuda.get_rng_state(device)``).
  On CUDA, caption drops (``TextConditioning.sample_drops``) and dropout draw from it. Each rank's own device
  state is gathered to rank 0 (a collective), so a resume at the same world size restores every rank's.
  Only the training device is stored, not every visible GPU: a process draws on its own device only.

Checkpoints written before the CUDA states existed (or on CPU) have no ``cuda.*`` keys and load as before.
A checkpoint with CUDA states resumed without CUDA, or on another number of ranks, resumes with a warning
that CUDA draws will not repeat those of the uninterrupted run (everything else still resumes exactly).
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["capture_rng", "restore_rng"]


def _torch_cuda():
    """``torch.cuda``; tests replace this with a fake module (no GPU needed to test the bookkeeping)."""
    return torch.cuda


def _cuda_index(device, cuda) -> int | None:
    """The CUDA device index this process trains on, or None when it does not train on CUDA."""
    if device is None or torch.device(device).type != "cuda" or not cuda.is_available():
        return None
    index = torch.device(device).index
    return cuda.current_device() if index is None else index


def capture_rng(generator: torch.Generator | None, device=None, dist=None, *, cuda=None) -> dict[str, torch.Tensor]:
    """The states to store in ``rng.safetensors`` (see the module docstring).

    ``device``: the device this rank trains on (its CUDA RNG is captured when it is a CUDA device).
    ``dist``: the run's ``DistributedContext``; with several ranks every rank must call this (it gathers each
    rank's CUDA state), and every rank gets the whole dict. ``cuda``: the ``torch.cuda`` module (tests pass a
    fake one)."""
    cuda = _torch_cuda() if cuda is None else cuda
    out = {"torch": torch.get_rng_state()}
    if generator is not None:
        out["task"] = generator.get_state()
    index = _cuda_index(device, cuda)
    mine = cuda.get_rng_state(index).tolist() if index is not None else None
    ranks = dist.gather(mine) if dist is not None and dist.enabled else [mine]
    for r, state in enumerate(ranks):
        if state is not None:
            out[f"cuda.{r}"] = torch.tensor(state, dtype=torch.uint8)
    return out


def restore_rng(states: dict[str, torch.Tensor], generator: torch.Generator | None, device=None, rank: int = 0,
                world: int = 1, *, cuda=None, where: str = "the checkpoint") -> None:
    """Set the RNGs from :func:`capture_rng`'s dict (``rank`` / ``world``: this process in the resumed run).
    Warns (``RuntimeWarning``) when CUDA states cannot be restored one-to-one; raises ``ValueError`` when the
    task generator's state does not fit this task's generator."""
    cuda = _torch_cuda() if cuda is None else cuda
    torch.set_rng_state(states["torch"])
    if "task" in states and generator is not None:
        try:
            generator.set_state(states["task"])
        except RuntimeError as e:
            raise ValueError(f"{where}: the task generator's saved state ({states['task'].numel()} bytes) does not "
                             f"fit this task's {generator.device.type} generator ({e}); it was written by a run "
                             f"whose generator lived on another device type. Resume on the same device type, or "
                             f"start a new run_dir from the last export") from None
    saved = sorted(int(k.split(".", 1)[1]) for k in states if k.startswith("cuda."))
    index = _cuda_index(device, cuda)
    if not saved:
        if index is not None and rank == 0:
            warnings.warn(f"{where} holds no CUDA RNG state (written on CPU or by an older snapgen): CUDA random "
                          f"draws (caption drops, dropout) restart from the seed, so the resumed run is not "
                          f"bit-identical to an uninterrupted one", RuntimeWarning, stacklevel=2)
        return
    if index is None:
        if rank == 0:
            warnings.warn(f"{where} holds CUDA RNG states of {len(saved)} rank(s), but this run does not train on "
                          f"CUDA (device {device}; cuda available: {cuda.is_available()}): CUDA random draws "
                          f"(caption drops, dropout) will not repeat those of the uninterrupted run. Resume on "
                          f"CUDA with the same number of ranks for an exact resume", RuntimeWarning, stacklevel=2)
        return
    if len(saved) != world and rank == 0:
        warnings.warn(f"{where} holds CUDA RNG states of {len(saved)} rank(s), this run has {world}: ranks "
                      f"restore the state of the rank with their number where one was saved, the others keep "
                      f"the seeded state, so CUDA random draws differ from an uninterrupted run. Resume with "
                      f"{len(saved)} rank(s) for an exact resume", RuntimeWarning, stacklevel=2)
    if f"cuda.{rank}" in states:
        cuda.set_rng_state(states[f"cuda.{rank}"], index)
