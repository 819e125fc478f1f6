#!/usr/bin/env bash
# Install the package with its test extras, lint with ruff, and run the default (CPU) test suite.
# CI installs the exact versions of constraints/ci.txt, so an upstream release cannot break a
# submission overnight; LLADA_CPT_UNPINNED=1 installs the newest versions setup.py allows instead
# (run it on purpose to find drift, then refresh the constraints).
# Exit code 5 (no tests collected) is a failure, not a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
constraints=()
if [ "${LLADA_CPT_UNPINNED:-0}" != "1" ]; then
  pins=constraints/ci.txt
  if python -c "import torch" 2>/dev/null; then
    # keep an installed torch (GPU images bring their own build): pin everything else
    pins=$(mktemp) && trap 'rm -f "$pins"' EXIT
    grep -v '^torch==' constraints/ci.txt > "$pins"
  else
    python -m pip install -q -c constraints/ci.txt torch || exit 1  # the CPU wheel
  fi
  constraints=(-c "$pins")
else
  python -c "import torch" 2>/dev/null || python -m pip install -q torch || exit 1
fi
python -m pip install -q ${constraints[@]+"${constraints[@]}"} -e '.[test,hf,rl,eval]' || exit 1
# Lint first (seconds; ruff.toml holds the rules): style problems fail before the long suite runs.
if ! python -m ruff check --quiet .; then
  echo "ruff found style problems: run \`ruff check --fix .\` (imports, unused names), wrap the long lines" \
       "by hand, then \`ruff check .\` until it passes" >&2
  exit 1
fi
python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
