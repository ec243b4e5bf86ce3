"""Packaging (docs/installation.md): `pip install snapgen` is the library alone and the demos' packages are
extras. pyproject.toml and snapgen.utils.extras agree; src/ imports only core dependencies at module level;
the library runs (import, CLI help, model, save/load, Hub-cache id, sampler, pipeline) with every extra made
unimportable; and each missing extra is an ImportError naming it. The real clean-venv install is
scripts/check_clean_install.sh, run by the slow test at the end (its fast twin here: the blocked-extras run)."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from snapgen.utils.extras import EXTRAS

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "snapgen"
try:
    import tomllib  # novm (Python 3.11+; tomli below on 3.10)
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

# import name -> distribution: every third-party package src/ may import at module level
CORE = {"torch": "torch", "numpy": "numpy", "safetensors": "safetensors", "PIL": "pillow", "tqdm": "tqdm",
        "yaml": "pyyaml", "scipy": "scipy", "transformers": "transformers", "huggingface_hub": "huggingface_hub"}


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")


@pytest.fixture(scope="module")
def project():
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_pyproject_core_dependencies_python_and_torch_range(project):
    deps = {_name(r): r for r in project["dependencies"]}
    assert set(deps) == {_name(d) for d in CORE.values()}  # no demo/toolchain package in the core, no einops
    assert re.fullmatch(r"torch>=2\.\d+", deps["torch"]), "a range, not a pin: constraints/cpu.txt pins for make"
    assert project["requires-python"] == ">=3.10,<3.14"
    pins = [ln for ln in (REPO / "constraints" / "cpu.txt").read_text().splitlines() if ln and ln[0] != "#"]
    assert pins == ["torch==2.13.0"]
    makefile = (REPO / "Makefile").read_text()
    assert "CONSTRAINTS ?= constraints/cpu.txt" in makefile
    assert re.search(r"^PIP := .*pip install .*-c \$\(CONSTRAINTS\)", makefile, flags=re.M)
    recipes = [ln for ln in makefile.splitlines() if ln.startswith("\t") and "pip" in ln.lower()]
    assert recipes and all(ln.startswith("\t$(PIP) ") for ln in recipes), recipes  # every install takes -c
    assert "\t$(PIP) -e '.[demo,kernel]'" in recipes


def test_extras_table_matches_pyproject(project):
    extras = {k: {_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    for module, (dist, extra, _) in EXTRAS.items():
        assert _name(dist) in extras[extra], f"{module}: {dist} is not in the {extra!r} extra"
    assert project["optional-dependencies"]["demo"] == ["snapgen[minilm,emoji,plots]"]
    test_extra = next(r for r in project["optional-dependencies"]["test"] if r.startswith("snapgen["))
    assert {"demo", "kernel", "export", "device"} <= set(test_extra[8:-1].split(","))


def _imports(tree: ast.AST, lazy: bool = False):
    """(line, top-level module name, inside a function?) of every absolute import."""
    for node in ast.iter_child_nodes(tree):
        inside = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name.split(".")[0], inside) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.lineno, node.module.split(".")[0], inside
        yield from _imports(node, inside)


def test_module_level_imports_are_core_dependencies_only():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        for line, top, inside in _imports(ast.parse(path.read_text())):
            if top in sys.stdlib_module_names or top == "snapgen" or inside:
                continue
            if top not in CORE:
                bad.append(f"{path.relative_to(SRC)}:{line} imports {top} at module level")
    assert not bad, "extras must be imported lazily (snapgen.utils.extras.require):\n" + "\n".join(bad)


CHILD = r"""
import io, json, os, sys, contextlib
BLOCKED = json.loads(os.environ["BLOCKED"])
for name in BLOCKED:
    sys.modules[name] = None            # `import name` now raises ModuleNotFoundError, as if not installed
sys.path.insert(0, os.environ["TESTS"])
import torch
torch.set_num_threads(1)
out = {}

import snapgen
from snapgen.cli import main
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    try:
        main(["--help"])
    except SystemExit as e:
        out["help_exit"] = e.code
out["help"] = buf.getvalue()

from helpers.builders import build_pipeline, dummy_inputs, fake_hub_snapshot, nano, perturb_
from helpers.fakes import FakeEncoder
from snapgen.models import ThreeStageDiT, load_model
torch.manual_seed(0)
auto = perturb_(ThreeStageDiT(nano(bna_backend="auto")))
gather = ThreeStageDiT(nano(bna_backend="gather"))
gather.load_state_dict(auto.state_dict())
x, t, text, mask = dummy_inputs(auto.config)
cond = {"text": text, "text_mask": mask}
with torch.no_grad():
    v = auto(x, t, cond)
    out["auto_equals_gather"] = bool(torch.equal(v, gather(x, t, cond)))   # the kernel fell back to gather
    auto(x, t, cond)
from snapgen.attention.cpu_kernel import kernel_error
out["kernel_error"] = kernel_error()

auto.save_pretrained(os.environ["WORK"] + "/m")
out["card"] = os.path.isfile(os.environ["WORK"] + "/m/README.md")
fake_hub_snapshot(os.environ["HF_HUB_CACHE"], "org/nano", os.environ["WORK"] + "/m")
with torch.no_grad():
    out["reload_exact"] = bool(torch.equal(load_model(os.environ["WORK"] + "/m")(x, t, cond), v))
    out["hub_id_exact"] = bool(torch.equal(load_model("org/nano")(x, t, cond), v))

from snapgen.sampling import SamplerConfig, make_sampler
sampler = make_sampler(SamplerConfig("euler", steps=3))
with torch.no_grad():
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    z = sampler.sample(lambda z, tt: gather(z, tt, cond), noise)
out["sampled"] = list(z.shape) == list(x.shape) and bool(torch.isfinite(z).all())
pipe = build_pipeline(text_encoder=FakeEncoder())
out["image"] = list(pipe("a red circle", seed=0)[0].size)

errors = {}
def err(key, fn):
    try:
        fn()
    except ImportError as e:
        errors[key] = f"{type(e).__name__}: {e}"
from snapgen.text import MiniLMEncoder
err("minilm", MiniLMEncoder)
from snapgen.data import EmojiDataset
WORK = os.environ["WORK"]
err("emoji", lambda: EmojiDataset(resolution=16, limit=2, cache_dir=WORK + "/emoji", progress=False))
from snapgen.vae import DiffusersAutoencoder
os.makedirs(WORK + "/kl")
open(WORK + "/kl/config.json", "w").write('{"_class_name": "AutoencoderKL"}')  # read before diffusers is imported
err("diffusers", lambda: DiffusersAutoencoder.from_pretrained(WORK + "/kl"))
out["errors"] = errors
from snapgen.train.plots import plot_metrics
open(os.environ["WORK"] + "/metrics.jsonl", "w").write('{"step": 1, "loss": 1.0}\n')
out["plotted"] = [plot_metrics(WORK + "/metrics.jsonl", WORK + "/loss.png") for _ in range(2)]
out["loaded"] = sorted(m for m in BLOCKED if sys.modules.get(m) is not None)
print("RESULT " + json.dumps(out))
"""


def test_library_runs_with_every_extra_missing(tmp_path):
    """The core paths with the extras' modules unimportable and no ninja on PATH (the fused kernel must then fall
    back to gather with one logged line), and each missing extra's error naming the extra to install."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "hf").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SNAPGEN_", "HF_"))}
    env.update(BLOCKED=json.dumps(sorted(EXTRAS)), TESTS=str(REPO / "tests"), WORK=str(tmp_path),
               PATH=str(tmp_path / "bin"), HF_HUB_CACHE=str(tmp_path / "hf"), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=600,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert out["help_exit"] == 0 and "generate" in out["help"] and "train" in out["help"]
    assert out["auto_equals_gather"] and "snapgen[kernel]" in out["kernel_error"]
    assert proc.stderr.count("fused CPU BNA kernel unavailable") == 1, proc.stderr  # one line, not one per call
    assert out["card"] and out["reload_exact"] and out["hub_id_exact"]  # HF_HUB_CACHE read from the environment
    assert out["sampled"] and out["image"] == [16, 16]
    for key, extra in (("minilm", "minilm"), ("emoji", "emoji"), ("diffusers", "diffusers")):
        assert f"pip install 'snapgen[{extra}]'" in out["errors"][key], out["errors"]
    assert out["errors"]["minilm"].startswith("MissingExtra: the MiniLM text encoder")
    assert out["plotted"] == [False, False] and proc.stdout.count("note: the training loss plot") == 1
    assert out["loaded"] == []


@pytest.mark.slow
def test_clean_venv_install_without_extras(tmp_path):
    """`pip install .` into a new venv (scripts/check_clean_install.sh; about 2-4 min, mostly pip)."""
    proc = subprocess.run(["bash", str(REPO / "scripts" / "check_clean_install.sh"), str(tmp_path / "venv")],
                          capture_output=True, text=True, timeout=1800, cwd=str(REPO))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "clean install OK" in proc.stdout
    print(proc.stdout)  # versions and per-stage times (pytest -s shows them)
