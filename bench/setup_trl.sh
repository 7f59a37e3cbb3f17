#!/usr/bin/env bash
# The TRL side of the benches runs in its own interpreter: this makes one at .venv-trl/ (beside the
# repository's files, ignored by git), with the CPU torch pin first and the TRL release the README's
# figures were measured with. The benches find it there; `--trl_python PATH` picks another one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
VENV="${TRL_VENV:-.venv-trl}"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
"$VENV/bin/python" -m pip install -q "${TRL_SPEC:-trl==1.16.0}"
"$VENV/bin/python" -c "import trl; print('trl', trl.__version__, 'in', '$VENV')"
