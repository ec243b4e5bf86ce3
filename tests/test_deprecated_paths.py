"""Modules that moved in the registry refactor still import from their old paths (for one release), with a
DeprecationWarning naming the new place, and give the very same objects."""

import importlib
import sys
import warnings

import pytest

MOVED = [
    ("snapgen.models.dit", "ThreeStageDiT", "snapgen.models.three_stage_dit"),
    ("snapgen.models.io", "ModelIOMixin", "snapgen.nn.io"),
    ("snapgen.elastic.ops", "LoRA", "snapgen.nn.elastic"),
    ("snapgen.elastic.ops", "ElasticLinear", "snapgen.nn.elastic"),
    ("snapgen.distill.lora", "merge_lora", "snapgen.nn.lora"),
    ("snapgen.train.tasks", "FlowTask", "snapgen.tasks"),
    ("snapgen.train.tasks", "batch_indices", "snapgen.data.batches"),
    ("snapgen.flow.sampling", "few_step_sample", "snapgen.sampling"),
]


@pytest.mark.parametrize("old, name, new", MOVED)
def test_old_module_paths_warn_and_reexport(old, name, new):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = importlib.import_module(old)
    assert any(issubclass(w.category, DeprecationWarning) and old in str(w.message) for w in caught)
    assert getattr(mod, name) is getattr(importlib.import_module(new), name)


def test_the_library_itself_never_imports_a_deprecated_path():
    import subprocess

    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning); "
            "import snapgen, snapgen.cli, snapgen.tasks, snapgen.train, snapgen.export.onnx, snapgen.export.quantize, "
            "snapgen.eval, snapgen.elastic, snapgen.distill.kdmd, snapgen.pipelines, snapgen.flow, snapgen.sampling; "
            "snapgen.cli.build_parser()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_legacy_denoiser_call_warns_at_the_callers_line():
    import torch

    from snapgen.models import build_model

    model = build_model("snapgenpp/nano").eval()
    x, t, text = torch.randn(1, 4, 16, 16), torch.rand(1), torch.randn(1, 3, 32)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        old = model(x, t, text)
    (w,) = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert w.filename == __file__, w.filename  # points at this line, not into torch.nn
    assert torch.equal(old, model(x, t, {"text": text}))
