"""scripts/gpu_check.py (issue 19 §6) at --smoke sizes on the CPU: every check of the GPU check runs here
too (so the script cannot rot between GPU sessions), the table is printed, and a failing check fails it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def run(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), "--smoke", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.distributed  # starts training subprocesses (the resume check SIGKILLs one)
def test_every_check_passes_at_smoke_sizes(tmp_path):
    out = tmp_path / "gpu.md"
    r = run("--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    rows = {ln.split("|")[1].strip(): ln.split("|")[2].strip() for ln in out.read_text().splitlines()
            if ln.startswith("| ") and not ln.startswith("| check")}
    assert set(rows) == {"flow-bf16", "elastic", "dmd", "kdmd", "generate", "bna", "resume", "torchrun"}
    assert rows["torchrun"] == "skip"  # no two GPUs here
    assert all(v == "pass" for k, v in rows.items() if k not in ("torchrun",)), rows
    assert "killed after step 8 of 12; bit-exact" in out.read_text()


def test_a_failing_check_fails_the_run_and_the_others_still_run():
    r = run("--only", "generate,flow-bf16", "--fail", "generate")
    assert r.returncode == 1
    assert "| generate | FAIL |" in r.stdout and "| flow-bf16 | pass |" in r.stdout
    r = run("--only", "nope")
    assert r.returncode == 2 and "unknown check(s) ['nope']" in r.stderr
