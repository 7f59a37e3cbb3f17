#!/usr/bin/env bash
# The test command: installs what is missing, then runs every test (unit + 2-rank end-to-end).
# Extra arguments go to pytest, e.g. `bash tests/run.sh -m "not e2e"` for the fast unit tests only.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider --durations=15 "$@"
