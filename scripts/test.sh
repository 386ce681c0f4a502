#!/usr/bin/env bash
# The test command: install, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# two workers (CI has 2 cores); tests/conftest.py groups the tests so that each file, and every
# test of Ray, runs on one worker in collection order (`-n 0` after these runs it in one process)
exec python3 -m pytest -n 2 --dist loadgroup --no-loadscope-reorder "$@"
