#!/usr/bin/env bash
# Run the test suite (CPU). pytest exit code 5 ("no tests collected") is treated as a failure
# of the suite's own setup, never as success.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" -m ruff check . || exit 1
"$PY" -m pytest -q "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
