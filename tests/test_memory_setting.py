"""The CPU allocator setting of long runs (snapgen.utils.memory): freed tensor memory stays in the process.

Each case runs in a fresh interpreter, since the setting is process-wide and cannot be undone.
"""

import json
import os
import platform
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, os, sys
import torch
from snapgen.utils.memory import retain_freed_memory

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

applied = retain_freed_memory() if sys.argv[1] == "retain" else None
again = retain_freed_memory() if sys.argv[1] == "retain" else None
before = rss_mib()
x = torch.empty(64 * 2**20 // 4)  # 64 MiB: above glibc's largest mmap threshold
x.fill_(1.0)                       # touch every page
del x
after = rss_mib()
print(json.dumps({"applied": applied, "again": again, "kept_mib": after - before}))
"""

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="the setting is specific to glibc on Linux")


def run(mode: str, env_value: str | None = None) -> dict:
    env = dict(os.environ)
    env.pop("SNAPGEN_CPU_ALLOCATOR", None)
    if env_value is not None:
        env["SNAPGEN_CPU_ALLOCATOR"] = env_value
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_freed_memory_is_kept_only_with_the_setting():
    default = run("default")
    retained = run("retain")
    assert retained["applied"] is True and retained["again"] is True  # idempotent
    # glibc default: the 64 MiB block was its own mmap and went back to the OS on free
    assert default["kept_mib"] < 16, default
    # with the setting: it came from the heap and stays mapped, ready for the next step's tensors
    assert retained["kept_mib"] > 48, retained


@glibc_only
def test_environment_opt_out_leaves_glibc_alone():
    out = run("retain", env_value="default")
    assert out["applied"] is False and out["kept_mib"] < 16, out
