#!/usr/bin/env bash
# Installs evomerge with its test extra. torch is installed first, pinned, so that
# the resolver never swaps in a CUDA build (several GB) on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python3 -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
