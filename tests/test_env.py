"""snapgen.env: the environment variables (one parser, clear errors), describe(), the BNA backend report, that
library code leaves os.environ alone, and that a CLI run prints nothing from third-party libraries."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.builders import save_tiny_bert

from snapgen import env
from snapgen.attention import backend_report, block_neighborhood_attention, make_geometry

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, **extra_env) -> subprocess.CompletedProcess:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPGEN_")}
    child_env.update(extra_env)
    child_env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), child_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env,
                          timeout=600, cwd=str(REPO))


def test_defaults_and_runtime_values(monkeypatch, tmp_path):
    for name in env.VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert env.model_dir() == REPO / "models" / "snapgen-micro"
    assert env.scene_detector_dir() == REPO / "models" / "evaluators" / "scene-detector"
    assert env.image_encoder_dir() == REPO / "models" / "evaluators" / "image-encoder"
    assert env.cache_dir() == Path.home() / ".cache" / "snapgen"
    assert env.bna_kernel_enabled() and env.cpu_allocator() == "retain" and env.flex_compile() == "auto"
    assert env.world_size() == 1 and env.local_rank() == 0
    # values are read when asked for, so monkeypatch works at run time; an empty path means the default
    monkeypatch.setenv("SNAPGEN_MODEL", str(tmp_path))
    monkeypatch.setenv("SNAPGEN_IMAGE_ENCODER", "")
    monkeypatch.setenv("SNAPGEN_CACHE", str(tmp_path / "c"))
    assert env.model_dir() == tmp_path
    assert env.image_encoder_dir() == REPO / "models" / "evaluators" / "image-encoder"
    from snapgen.data.emoji import default_cache_dir
    from snapgen.pipelines import default_model_dir

    assert default_model_dir() == tmp_path and default_cache_dir() == tmp_path / "c" / "emoji"
    for word in ("0", "false", "OFF", " no "):
        monkeypatch.setenv("SNAPGEN_BNA_KERNEL", word)
        assert not env.bna_kernel_enabled()
    for word in ("1", "true", "On", "yes", ""):
        monkeypatch.setenv("SNAPGEN_BNA_KERNEL", word)
        assert env.bna_kernel_enabled()
    for word, mode in (("", "auto"), ("Auto", "auto"), ("1", "on"), ("yes", "on"), ("0", "off"), ("OFF", "off")):
        monkeypatch.setenv("SNAPGEN_FLEX_COMPILE", word)
        assert env.flex_compile() == mode
    monkeypatch.setenv("SNAPGEN_CPU_ALLOCATOR", "Default")
    assert env.cpu_allocator() == "default"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert env.world_size() == 4 and env.local_rank() == 3


@pytest.mark.parametrize("name,value,fn", [("SNAPGEN_BNA_KERNEL", "maybe", env.bna_kernel_enabled),
                                           ("SNAPGEN_FLEX_COMPILE", "always", env.flex_compile),
                                           ("SNAPGEN_CPU_ALLOCATOR", "jemalloc", env.cpu_allocator),
                                           ("WORLD_SIZE", "two", env.world_size),
                                           ("WORLD_SIZE", "0", env.world_size),
                                           ("LOCAL_RANK", "-1", env.local_rank)])
def test_bad_values_name_the_variable(monkeypatch, name, value, fn):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        fn()
    assert "error" in str(env.describe()["resolved"])  # describe reports it instead of failing


def test_describe_is_json_and_names_what_changes_numerics(monkeypatch):
    monkeypatch.setenv("SNAPGEN_BNA_KERNEL", "1")
    monkeypatch.delenv("SNAPGEN_FLEX_COMPILE", raising=False)
    d = json.loads(json.dumps(env.describe("auto")))
    assert d["variables"]["SNAPGEN_BNA_KERNEL"] == "1" and d["torch"] == torch.__version__
    assert d["threads"] == torch.get_num_threads() and d["cpu"]
    att = d["numerics"]["attention"]
    assert att["requested"] == "auto"
    assert att["kernel_status"] in ("built", "not-loaded-yet", "build-failed")
    assert att["flex_compile"] == d["resolved"]["flex_compile"] == "auto"
    assert backend_report("gather")["kernel_status"] == "not-applicable"


def test_describe_does_not_build_the_kernel_and_auto_logs_its_choice():
    code = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.DEBUG, format='%(name)s|%(message)s')\n"
        "from snapgen import env\n"
        "from snapgen.attention import cpu_kernel, block_neighborhood_attention, make_geometry\n"
        "assert env.describe('auto')['numerics']['attention']['kernel_status'] == 'not-loaded-yet'\n"
        "assert not cpu_kernel._state['loaded'] and cpu_kernel._state['error'] is None\n"
        "q = torch.randn(1, 64, 2, 8)\n"
        "block_neighborhood_attention(q, q, q, make_geometry((8, 8), (4, 4), 1))\n"
        "block_neighborhood_attention(q, q, q, make_geometry((8, 8), (4, 4), 1))\n"
        "rep = env.describe('auto')['numerics']['attention']\n"
        "assert rep['kernel_status'] == 'not-loaded-yet', rep\n"
        "assert list(rep['auto_choices'].values()) == ['gather'], rep\n"
    )
    res = _python(code)
    assert res.returncode == 0, res.stderr
    logged = [ln for ln in res.stderr.splitlines() if ln.startswith("snapgen.attention|")]
    assert len(logged) == 1 and "'gather'" in logged[0] and "2-D tiles" in logged[0], res.stderr


def test_backend_report_when_disabled_by_env():
    res = _python("from snapgen.attention import backend_report, block_neighborhood_attention, make_geometry\n"
                  "import torch\n"
                  "assert backend_report('auto')['kernel_status'] == 'disabled-by-env'\n"
                  "q = torch.randn(1, 64, 2, 8)\n"
                  "block_neighborhood_attention(q, q, q, make_geometry((8, 8), (2, 0), 1))\n"
                  "r = backend_report('auto')\n"
                  "assert r['kernel_status'] == 'disabled-by-env' and r['kernel_error'] is None, r\n"
                  "(reason, backend), = r['auto_choices'].items()\n"
                  "assert backend == 'gather' and 'SNAPGEN_BNA_KERNEL=0' in reason, r\n",
                  SNAPGEN_BNA_KERNEL="0")
    assert res.returncode == 0, res.stderr


def test_auto_choice_is_recorded_in_process():
    q = torch.randn(1, 64, 2, 8)
    block_neighborhood_attention(q.double(), q.double(), q.double(), make_geometry((8, 8), (2, 0), 1))
    choices = backend_report("auto")["auto_choices"]
    assert any("float64" in reason and b == "gather" for reason, b in choices.items()), choices


def test_loading_a_text_encoder_leaves_os_environ_unchanged(tmp_path, monkeypatch):
    from snapgen.text import HFTextEncoder

    folder = save_tiny_bert(tmp_path / "bert", 16)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # conftest sets one; snapgen must not need them
        monkeypatch.delenv(name, raising=False)
    before = dict(os.environ)
    enc = HFTextEncoder(folder, max_length=8)
    tokens, mask = enc(["a red circle"])
    assert tokens.shape[-1] == 16 and mask.any()
    assert dict(os.environ) == before


def test_importing_snapgen_and_loading_a_text_encoder_in_a_fresh_process(tmp_path):
    folder = save_tiny_bert(tmp_path / "bert", 16)
    code = (
        "import os, sys\n"
        "import torch._dynamo  # torch's own default: its first import sets TORCHINDUCTOR_CACHE_DIR\n"
        "before = dict(os.environ)\n"
        "import snapgen, snapgen.cli, snapgen.pipelines, snapgen.eval, snapgen.train, snapgen.export\n"
        "from snapgen.text import HFTextEncoder\n"
        f"HFTextEncoder({str(folder)!r}, max_length=8)(['a blue square'])\n"
        "changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}\n"
        "assert not changed, changed\n"
    )
    child = {k: v for k, v in os.environ.items()
             if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TORCHINDUCTOR_CACHE_DIR")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**child, "PYTHONPATH": str(REPO / "src")})
    assert res.returncode == 0, res.stderr
    # and a model load prints nothing from third-party libraries (torchao's import chatter, pytree warnings)
    assert res.stderr == "", res.stderr


def _own_lines(stderr: str) -> list[str]:
    """stderr lines that are not snapgen's own: its note when the fused kernel cannot be built on this machine
    and its sampling progress bar (tqdm, cleared with blanks when done) are allowed; anything else is not."""
    own = ("fused CPU BNA kernel unavailable", "sampling:")
    return [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip() and not ln.strip().startswith(own)]


def test_cli_info_prints_nothing_on_stderr():
    res = _python("import sys; from snapgen.cli import main; sys.exit(main(['info', '--preset', 'nano']))")
    assert res.returncode == 0, res.stderr
    assert res.stderr == "" and "snapgen nano" in res.stdout


def test_cli_generate_with_the_shipped_model_is_quiet(tmp_path):
    out = tmp_path / "x.png"
    res = _python("import sys; from snapgen.cli import main; "
                  f"sys.exit(main(['generate', 'a red circle', '--steps', '2', '--out', {str(out)!r}]))")
    assert res.returncode == 0, res.stderr
    assert out.is_file()
    assert _own_lines(res.stderr) == [], res.stderr
