#!/usr/bin/env bash
# The GPU check (issue 19 §6): from the source tree, offline. Extra arguments go to scripts/gpu_check.py
# (--only flow-bf16,generate; --smoke for the CPU; --out FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
