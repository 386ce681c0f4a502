#!/usr/bin/env bash
# The test command: install, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec python3 -m pytest "$@"
