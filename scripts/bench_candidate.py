#!/usr/bin/env python3
"""Benchmark: seconds per candidate, evomerge's in-memory path against what a user would script.

For one recipe and the same task items, measured side by side in one run:
  (a) evomerge: merge into the worker's resident model in place, then score it with lm-eval;
  (b) the scripted pipeline: `mergekit-yaml` to a folder, then the `lm_eval` command on it;
  (c) the floor: the forward passes alone, the same requests run on task objects already built;
  (d) lm-eval's ``simple_evaluate`` on the model already loaded (what its Python API costs per call);
  (e) evomerge's scoring alone (filters, metrics, aggregation included), without the merge.
Prints (b)/(a) (goal: at least 5), (a)/(c) (goal: at most 1.2), (e)/(c) and (d)/(a), and the
merge's share of (a) as the worker records it. ``--no-pipeline`` skips (b) (minutes per repeat);
``--threads 1`` keeps torch from spinning threads on a machine others load.

    python scripts/bench_candidate.py [--toy-world toy_world] [--repeat 3] [--items N] [--threads 2] [--no-pipeline]

``--items`` defaults to the demo space's ``evaluation.items`` (``search_spaces/toy_ties.yaml``: 200,
every search item), what each of the demo's candidates is scored on. The merge does not grow with
the items, so the ratio (a)/(c) falls as they grow: on the 0.67M-parameter toy a merge takes about
as long as 100 forward passes, on a 7B model a second or two against minutes of scoring.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--toy-world", type=Path, default=ROOT / "toy_world")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--items", type=int, default=None,
                    help="items per task, the same in every path (default: the demo space's evaluation.items)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 on a machine others load)")
    ap.add_argument("--no-pipeline", action="store_true",
                    help="skip (b), the mergekit-yaml + lm_eval commands (minutes per repeat)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")

    import torch
    import yaml

    if args.items is None:
        args.items = int(yaml.safe_load((ROOT / "search_spaces" / "toy_ties.yaml").read_text())["evaluation"]["items"])

    from evomerge.evaluate import LmEvalScorer
    from evomerge.merge.config import parse_merge_config
    from evomerge.recipe import Recipe
    from evomerge.toy.build import build_toy_world
    from evomerge.worker import CandidateEvaluator, EvalSettings, WorkerSpec

    world = build_toy_world(args.toy_world)
    base = str(world.base)
    donors = [str(p) for _, p in sorted(world.specialists.items())]
    tasks = [f"toy_{name}" for name in sorted(world.specialists)]
    include = ROOT / "eval_tasks"
    config = {
        "merge_method": "ties", "base_model": base, "dtype": "float32",
        "models": [{"model": d, "parameters": {"weight": 0.8, "density": 0.6}} for d in donors],
    }
    samples = {t: list(range(args.items)) for t in tasks}
    torch.set_num_threads(args.threads)
    spec = WorkerSpec(base=base, donors=tuple(donors), threads=args.threads,
                      evaluation=EvalSettings(tasks=tuple(tasks), include_path=(str(include),), samples=samples, batch_size=32))
    evaluator = CandidateEvaluator(spec)
    recipe = Recipe(merge=parse_merge_config(config), params={}).to_json()
    evaluator.evaluate(recipe)  # warm-up: first-call costs (task loading) are paid once per worker

    def timed(fn) -> list[float]:
        out = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return out

    merge_s: list[float] = []  # the merge's share of (a), as the worker records it
    a = timed(lambda: merge_s.append(evaluator.evaluate(recipe).merge_s))
    scorer: LmEvalScorer = evaluator.scorer
    c = timed(lambda: scorer.run_requests(evaluator.model, evaluator.tokenizer))
    e = timed(lambda: scorer.evaluate(evaluator.model, evaluator.tokenizer))
    general = LmEvalScorer(list(tasks), include_path=include, samples=samples, batch_size=32,
                           extra_args={"write_out": False})  # an option only simple_evaluate applies: its path
    d = timed(lambda: general.score(evaluator.model, evaluator.tokenizer))
    cost = scorer.evaluate(evaluator.model, evaluator.tokenizer).cost

    if args.no_pipeline:
        report(args, len(donors), tasks, a, None, c, d, e, cost, merge_s)
        return
    mergekit = shutil.which("mergekit-yaml")
    lm_eval = shutil.which("lm_eval") or shutil.which("lm-eval")
    if not mergekit or not lm_eval:
        raise SystemExit("needs mergekit-yaml and lm_eval on PATH: bash scripts/install.sh")
    work = Path(tempfile.mkdtemp(prefix="bench_candidate_"))
    cfg = work / "recipe.yaml"
    cfg.write_text(yaml.safe_dump(config))
    limit_samples = json.dumps({t: list(range(args.items)) for t in tasks})

    def pipeline() -> None:
        out = work / "merged"
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([mergekit, str(cfg), str(out)], check=True, capture_output=True)
        subprocess.run([lm_eval, "--model", "hf", "--model_args", f"pretrained={out},dtype=float32",
                        "--tasks", ",".join(tasks), "--include_path", str(include), "--samples", limit_samples,
                        "--batch_size", "32", "--device", "cpu"],
                       check=True, capture_output=True)

    b = timed(pipeline)
    shutil.rmtree(work, ignore_errors=True)
    report(args, len(donors), tasks, a, b, c, d, e, cost, merge_s)


def report(args, donors, tasks, a, b, c, d, e, cost, merge_s) -> None:
    ma, mc, md, me, mm = (statistics.median(x) for x in (a, c, d, e, merge_s))
    print(f"recipe: ties over {donors} toy specialists; tasks {', '.join(tasks)}, {args.items} items each; "
          f"median of {args.repeat}; {args.threads} torch thread(s)")
    print(f"(a) evomerge in-memory merge + lm-eval : {ma:8.3f} s/candidate (the merge: {mm:.3f} s)")
    if b is not None:
        mb = statistics.median(b)
        print(f"(b) mergekit-yaml + lm_eval commands   : {mb:8.2f} s/candidate")
    print(f"(c) forward passes alone (the floor)   : {mc:8.3f} s/candidate ({cost.forward_passes} requests)")
    print(f"(d) simple_evaluate on a loaded model  : {md:8.3f} s/candidate")
    print(f"(e) evomerge's scoring alone, no merge : {me:8.3f} s/candidate")
    if b is not None:
        print(f"(b)/(a) = {mb / ma:.1f}   (goal: at least 5)")
    print(f"(a)/(c) = {ma / mc:.2f}  (goal: at most 1.2; the merge is the rest)")
    print(f"(e)/(c) = {me / mc:.2f}  (scoring's own cost beyond the forward passes)")
    print(f"(d)/(a) = {md / ma:.2f}  (lm-eval's per-call costs that the search no longer pays)")


if __name__ == "__main__":
    main()
