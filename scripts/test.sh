#!/usr/bin/env bash
# Install the package with its test extras and run the default (CPU) test suite.
# Exit code 5 (no tests collected) is a failure, not a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0  # the CPU wheel; GPU images bring their own
python -m pip install -q -e '.[test,hf,rl]' || exit 1
python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
