"""Shared test helpers: plain functions and classes, importable as ``helpers.<module>`` (fixtures live in
``tests/conftest.py``). Test files import from here, never from another ``test_*.py`` file or from
conftest.

- ``helpers.builders``: nano configs, parameter noise, dummy inputs, tiny pipelines, a tiny BERT, q/k/v tensors
- ``helpers.fakes``: a fake text encoder (no model loaded)
- ``helpers.runs``: trainer configs and caches, metrics and checkpoints of a run, torchrun
- ``helpers.teachers``: tiny random diffusers teachers (SD3, Flux-dev, Qwen-Image) saved as pipeline folders
"""
