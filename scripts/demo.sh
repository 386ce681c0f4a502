#!/usr/bin/env bash
# The main job, end to end on the toy world: install, build the toy world if missing, run a real
# search (resumes if interrupted), then compare its best recipe with hand-set merges on the
# held-out split and export it as mergekit YAML.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
evomerge toy build toy_world
evomerge search search_spaces/toy_ties.yaml
evomerge toy compare runs/toy_ties
evomerge export runs/toy_ties --best -o runs/toy_ties/best.yaml
echo "best recipe: runs/toy_ties/best.yaml (merge it with: evomerge merge runs/toy_ties/best.yaml merged/)"
