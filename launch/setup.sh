#!/usr/bin/env bash
# Installs the pipeline and its dependencies into the current Python environment (idempotent).
# torch is pinned first: an unpinned torch would pull the CUDA build (several GB) on a CPU machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "$TORCH_SPEC"
fi
if ! "$PY" -c "import deepspeed, transformers, peft, datasets, utils.ds" 2>/dev/null \
   || ! "$PY" -m pip show -q ds-rlhf >/dev/null 2>&1; then
  "$PY" -m pip install -q -e ".[test]"
fi
