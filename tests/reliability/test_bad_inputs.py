"""A corpus of bad inputs, each run through the real command line as a user would meet it.

Every case must end the same way: exit status 2, one message on stderr that names the field or
file and says the fix, no traceback, and the runs folder exactly as it was (absent when it was
absent; byte for byte the same when a run already existed). The cases are set up first, then run
a few at a time (each is a separate ``python -m evomerge.cli`` process), then checked one by one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from . import broken_models as bm
from .conftest import ROOT, cli_env, evomerge, fingerprint, good_space, write_yaml

pytestmark = pytest.mark.slow


@dataclass
class Ctx:
    """One case's folder, and helpers that build its inputs there."""

    dir: Path
    world: Any

    @property
    def runs(self) -> Path:
        return self.dir / "runs"

    def space(self, data: dict[str, Any] | None = None, name: str = "space.yaml", **changes: Any) -> str:
        return str(write_yaml(self.dir / name, data if data is not None else good_space(self.world, **changes)))

    def text(self, text: str, name: str = "space.yaml") -> str:
        (self.dir / name).write_text(text)
        return str(self.dir / name)

    def search(self, space: str) -> list[str]:
        return ["search", space, "--runs-dir", str(self.runs)]

    def broken(self, builder: Callable[..., Path], *args: Any, donor: str = "arith") -> Path:
        return builder(self.world.specialists[donor], self.dir / f"{donor}_{builder.__name__}", *args)

    def donor_space(self, folder: Path, **changes: Any) -> str:
        """The good space with the ``arith`` donor replaced by ``folder``."""
        donors = [str(folder), str(self.world.specialists["reverse"])]
        return self.space(**{"models.donors": donors, **changes})

    @property
    def marker(self) -> Path:
        return self.dir / "MARKER_code_ran"


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Ctx], list[str]]  # builds the inputs; returns the CLI arguments
    expect: tuple[str, ...]  # substrings stderr must hold: the field or file, and the fix
    watch: tuple[str, ...] = field(default=("runs",))  # folders (relative) that must not change


def _run_exists(ctx: Ctx) -> list[str]:
    from evomerge.search import open_store
    from evomerge.space_config import load_space_config

    open_store(load_space_config(ctx.space(name="first.yaml")), ctx.runs).close()
    return ctx.search(ctx.space(**{"search.seed": 7, "merge.parameters.lambda": 0.8}))


def _not_a_run(ctx: Ctx) -> Path:
    folder = ctx.runs / "bad"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes\n")
    return folder


def _export_trial_missing(ctx: Ctx) -> list[str]:
    from evomerge.search import open_store
    from evomerge.space_config import load_space_config

    open_store(load_space_config(ctx.space()), ctx.runs).close()
    return ["export", str(ctx.runs / "bad"), "--trial", "5"]


def _merge_yaml(ctx: Ctx, **changes: Any) -> str:
    w = ctx.world
    data = {"merge_method": "ties", "base_model": str(w.base), "dtype": "float32",
            "models": [{"model": str(p), "parameters": {"weight": 0.5, "density": 0.5}} for _, p in sorted(w.specialists.items())]}
    data.update(changes)
    return str(write_yaml(ctx.dir / "merge.yaml", data))


def _merge_with(ctx: Ctx, folder: Path, *extra: str) -> list[str]:
    data = {"merge_method": "task_arithmetic", "base_model": str(ctx.world.base), "dtype": "float32",
            "models": [{"model": str(folder), "parameters": {"weight": 1.0}}]}
    return ["merge", str(write_yaml(ctx.dir / "merge.yaml", data)), str(ctx.runs / "out"), *extra]


def _donor_copies(ctx: Ctx) -> dict[str, Path]:
    """Copies of the toy world's models in the case folder: a merge whose output may land on its
    own input must never be tried on the shared toy world."""
    models = {"base": ctx.world.base, **ctx.world.specialists}
    return {name: bm.copy_model(path, ctx.dir / "models" / name) for name, path in models.items()}


def _merge_onto_input(ctx: Ctx, where: Callable[[dict[str, Path]], Path]) -> list[str]:
    models = _donor_copies(ctx)
    data = {"merge_method": "ties", "base_model": str(models["base"]), "dtype": "float32",
            "models": [{"model": str(models[n]), "parameters": {"weight": 0.5, "density": 0.5}} for n in ("arith", "reverse")]}
    out = where(models)
    return ["merge", str(write_yaml(ctx.dir / "merge.yaml", data)), str(out), "--overwrite"]


def _a_file(ctx: Ctx, name: str = "notes.txt") -> Path:
    (ctx.dir / name).write_text("my notes\n")
    return ctx.dir / name


_HELD: list[Any] = []  # locks this test process holds while the batch runs (a live holder)


def _run_held(ctx: Ctx) -> list[str]:
    """The run exists and a live process (this one) is driving it."""
    from evomerge.run_lock import acquire
    from evomerge.search import open_store
    from evomerge.space_config import load_space_config

    space = ctx.space()
    open_store(load_space_config(space), ctx.runs).close()
    _HELD.append(acquire(ctx.runs / "bad"))
    return ctx.search(space)


def _resume_duplicate_key(ctx: Ctx) -> list[str]:
    from evomerge.search import open_store
    from evomerge.space_config import load_space_config

    open_store(load_space_config(ctx.space()), ctx.runs).close()
    space = ctx.runs / "bad" / "space.yaml"
    space.write_text(space.read_text() + "name: other\n")  # edited by hand: a second name
    return ["resume", str(ctx.runs / "bad")]


_DUPLICATE_BUDGET = """name: bad
models: {{base: {base}, donors: [{arith}, {reverse}]}}
merge: {{method: ties, layer_groups: 1, filters: [mlp]}}
objectives: [{{task: toy_arith, metric: acc, direction: maximize}}]
evaluation: {{items: 8, batch_size: 8, include_path: [{tasks}]}}
search:
  driver: cma
  budget: 2
  seed: 0
  budget: 200
"""


def _duplicate_budget(ctx: Ctx) -> list[str]:
    w = ctx.world
    return ctx.search(ctx.text(_DUPLICATE_BUDGET.format(base=w.base, arith=w.specialists["arith"],
                                                       reverse=w.specialists["reverse"], tasks=ROOT / "eval_tasks")))


def _merge_duplicate_base(ctx: Ctx) -> list[str]:
    w = ctx.world
    text = (f"merge_method: ties\nbase_model: {w.base}\ndtype: float32\nmodels:\n"
            f"  - model: {w.specialists['arith']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            f"base_model: {w.specialists['reverse']}\n")
    return ["merge", ctx.text(text, "merge.yaml"), str(ctx.runs / "out")]


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


CASES = [
    # -- the space file: fields ----------------------------------------------------------------
    Case("missing-section", lambda c: c.search(c.space(search=None)), ("search: missing; this field is required",)),
    Case("missing-field", lambda c: c.search(c.space(**{"models.base": None})), ("models.base: missing",)),
    Case("misspelled-field", lambda c: c.search(c.space(**{"search.budjet": 5})),
         ("search.budjet: unknown field. Did you mean 'budget'?",)),
    Case("misspelled-section", lambda c: c.search(c.space(objectivs=[{"task": "toy_arith"}])),
         ("objectivs: unknown field. Did you mean 'objectives'?",)),
    Case("misspelled-parameter", lambda c: c.search(c.space(**{"merge.parameters.densty": {"range": [0.1, 1]}})),
         ("merge.parameters.densty: no chosen method takes 'densty'", "Did you mean 'density'?")),
    Case("wrong-type-number", lambda c: c.search(c.space(**{"search.budget": "many"})),
         ("search.budget: expected a whole number, got 'many'",)),
    Case("wrong-type-list", lambda c: c.search(c.space(**{"models.donors": str(c.world.specialists["arith"])})),
         ("models.donors: expected a list",)),
    Case("wrong-type-bool", lambda c: c.search(c.space(trust_remote_code="yes")),
         ("trust_remote_code: expected true or false, got 'yes'",)),
    Case("inverted-range", lambda c: c.search(c.space(**{"merge.parameters.density": {"range": [0.9, 0.2]}})),
         ("merge.parameters.density.range: low 0.9 is above high 0.2; write [low, high]",)),
    Case("unknown-method", lambda c: c.search(c.space(**{"merge.method": "tiess"})),
         ("merge.method: unknown merge method 'tiess'", "Did you mean 'ties'")),
    Case("unknown-driver", lambda c: c.search(c.space(**{"search.driver": "cmaes"})),
         ("search.driver: unknown driver 'cmaes'", "Did you mean 'cma'")),
    Case("unknown-dtype", lambda c: c.search(c.space(**{"merge.dtype": "fp16"})), ("merge.dtype: unknown dtype 'fp16'",)),
    Case("storage-not-url", lambda c: c.search(c.space(storage="trials.db")),
         ("storage: 'trials.db' is not a database URL", "postgresql://")),
    Case("storage-password", lambda c: c.search(c.space(storage="postgresql://evo:s3cret@db/evo")),
         ("storage: the URL holds a password", "${")),
    # -- the space file: checked against the models and tasks ----------------------------------
    Case("unknown-task", lambda c: c.search(c.space(**{"objectives.0.task": "toy_arithmetic"})),
         ("space.yaml: objectives[0].task: unknown lm-eval task 'toy_arithmetic'", "Did you mean 'toy_arith'")),
    Case("unknown-metric", lambda c: c.search(c.space(**{"objectives.1.metric": "accuracy"})),
         ("objectives[1].metric: task 'toy_reverse' has no metric 'accuracy'", "Its metrics: acc")),
    Case("task-folder-missing", lambda c: c.search(c.space(**{"evaluation.include_path": [str(c.dir / "tasks")]})),
         ("space.yaml: evaluation.include_path[0]: task folder", "does not exist; point it at a folder")),
    Case("layer-groups", lambda c: c.search(c.space(**{"merge.layer_groups": 3})),
         ("merge.layer_groups: 3 layer groups do not divide the models' 4 layers; use one of 1, 2, 4",)),
    Case("filter-matches-nothing", lambda c: c.search(c.space(**{"merge.filters": ["mlpp"]})),
         ("merge.filters[0]: filter 'mlpp' matches no tensor", "Did you mean 'mlp'")),
    # -- the space file as a file ----------------------------------------------------------------
    Case("no-such-file", lambda c: c.search(str(c.dir / "nope.yaml")), ("no such space file", "nope.yaml")),
    Case("not-yaml", lambda c: c.search(c.text("merge: [unclosed\n")), ("space.yaml: not valid YAML",)),
    Case("not-a-mapping", lambda c: c.search(c.text("- models\n- merge\n")), ("space.yaml: expected a mapping",)),
    Case("empty-file", lambda c: c.search(c.text("")), ("space.yaml: expected a mapping",)),
    Case("yaml-python-tag", lambda c: c.search(c.text(f"!!python/object/apply:os.system ['touch {c.marker}']\n")),
         ("space.yaml: not valid YAML",)),
    # -- model folders ---------------------------------------------------------------------------
    Case("model-missing", lambda c: c.search(c.space(**{"models.base": str(c.dir / "no_base")})),
         ("model folder not found", "no_base", "check the path")),
    Case("model-no-config", lambda c: c.search(c.donor_space(c.broken(bm.no_config))),
         ("arith_no_config: no config.json", "Hugging Face model folder")),
    Case("model-bad-config-json", lambda c: c.search(c.donor_space(c.broken(bm.bad_config_json))),
         ("arith_bad_config_json/config.json: not valid JSON",)),
    Case("model-base-no-tokenizer",
         lambda c: c.search(c.space(**{"models.base": str(bm.no_tokenizer(c.world.base, c.dir / "base_no_tokenizer"))})),
         ("space.yaml: models.base:", "base_no_tokenizer: no tokenizer transformers can load", "copy the tokenizer files")),
    Case("model-no-weights", lambda c: c.search(c.donor_space(c.broken(bm.no_weights))),
         ("arith_no_weights: no weights found", "safetensors")),
    Case("model-truncated-data", lambda c: c.search(c.donor_space(c.broken(bm.truncated_data))),
         ("arith_truncated_data/model.safetensors", "truncated", "download")),
    Case("model-truncated-header", lambda c: c.search(c.donor_space(c.broken(bm.truncated_header))),
         ("arith_truncated_header/model.safetensors", "download")),
    Case("model-missing-shard", lambda c: c.search(c.donor_space(c.broken(bm.missing_shard))),
         ("model.safetensors.index.json lists model-00002-of-00002.safetensors, which is missing", "re-download")),
    Case("model-pickled-only", lambda c: c.search(c.donor_space(c.broken(bm.pickled_weights, c.marker))),
         ("arith_pickled_weights: weights are pickled .bin files (pytorch_model.bin)", "Convert them to safetensors")),
    Case("model-other-architecture", lambda c: c.search(c.donor_space(c.broken(bm.other_architecture))),
         ("space.yaml: models: the models have different architectures", "arith_other_architecture': gpt2",
          "merge fine-tunes of one base model")),
    Case("model-other-hidden-size", lambda c: c.search(c.donor_space(c.broken(bm.other_hidden_size))),
         ("space.yaml: models: the models have different architectures", "arith_other_hidden_size': llama (hidden_size 64)",
          "merge fine-tunes of one base model")),
    Case("model-other-vocabulary", lambda c: c.search(c.donor_space(c.broken(bm.other_vocabulary))),
         ("space.yaml: models: the models have different vocabularies", "arith_other_vocabulary': [56, 128]",
          "share the base's tokenizer and vocabulary size")),
    Case("model-other-layer-count", lambda c: c.search(c.donor_space(c.broken(bm.other_layer_count))),
         ("space.yaml: models: models have different numbers of layers", "arith_other_layer_count': 3",
          "merge fine-tunes of one base model")),
    Case("model-remote-code-untrusted", lambda c: c.search(c.donor_space(c.broken(bm.remote_code, c.marker))),
         ("space.yaml: models.donors[0]:", "arith_remote_code: its architecture ('evotoy_remote') is defined by code",
          "if you trust it, set trust_remote_code: true in the space file")),
    # -- run names -------------------------------------------------------------------------------
    Case("run-exists-other-config", _run_exists,
         ("runs/bad/space.yaml: run 'bad' already exists with a different config", "search.seed: 0 -> 7",
          "merge.parameters.lambda", "choose a new run name")),
    Case("run-name-taken-by-other-folder", lambda c: (_not_a_run(c), c.search(c.space()))[1],
         ("runs/bad exists and is not an evomerge run folder", "choose another run name")),
    Case("ray-address-unreachable", lambda c: [*c.search(c.space()), "--ray-address", "127.0.0.1:9"],
         ("--ray-address", "127.0.0.1:9", "ray status")),
    # -- the other commands ----------------------------------------------------------------------
    Case("merge-unknown-method", lambda c: ["merge", _merge_yaml(c, merge_method="tie"), str(c.runs / "out")],
         ("merge.yaml: invalid merge config", "merge_method: unknown merge method 'tie'", "Did you mean 'ties'")),
    Case("merge-misspelled-field", lambda c: ["merge", _merge_yaml(c, dtyp="float32"), str(c.runs / "out")],
         ("merge.yaml: invalid merge config", "dtyp: unknown field. Did you mean 'dtype'")),
    Case("merge-python-tag", lambda c: ["merge", c.text(f"!!python/object/apply:os.system ['touch {c.marker}']\n",
                                                       "merge.yaml"), str(c.runs / "out")],
         ("merge.yaml: not valid YAML",)),
    Case("merge-truncated-model", lambda c: _merge_with(c, c.broken(bm.truncated_data)),
         ("arith_truncated_data/model.safetensors", "truncated")),
    Case("merge-pickle-allowed-but-unsafe", lambda c: _merge_with(c, c.broken(bm.pickled_weights, c.marker), "--allow-pickle"),
         ("pytorch_model.bin: cannot be read as a tensors-only checkpoint and was refused", "Unsupported global",
          "convert it to safetensors")),
    Case("show-not-a-run", lambda c: ["show", str(_not_a_run(c))], ("runs/bad is not an evomerge run folder", "give the folder `evomerge search` made")),
    Case("export-not-a-run", lambda c: ["export", str(_not_a_run(c)), "--best"], ("runs/bad is not an evomerge run folder",)),
    Case("resume-not-a-run", lambda c: ["resume", str(_not_a_run(c))], ("runs/bad is not an evomerge run folder",)),
    Case("export-nothing-yet", _export_trial_missing, ("runs/bad: no completed trial to export yet",)),
    # -- issue 9: duplicate keys (one strict loader for every YAML a user writes) ------------------
    Case("yaml-duplicate-key-space", _duplicate_budget,
         ("space.yaml: key 'budget' appears twice in one mapping, on line 8 and on line 10; keep one",)),
    Case("yaml-duplicate-key-merge", _merge_duplicate_base,
         ("merge.yaml: key 'base_model' appears twice in one mapping, on line 2 and on line 7",)),
    Case("yaml-duplicate-key-resume", _resume_duplicate_key,
         ("runs/bad/space.yaml: key 'name' appears twice in one mapping, on line 1 and on line",)),
    # -- issue 9: what every trial would use, checked before the run folder exists --------------
    Case("lm-eval-args-unknown", lambda c: c.search(c.space(**{"evaluation.lm_eval_args": {"verbosityy": "INFO"}})),
         ("space.yaml: evaluation.lm_eval_args.verbosityy: lm-eval's simple_evaluate takes no argument 'verbosityy'",
          "Did you mean 'verbosity'")),
    Case("num-fewshot-too-many", lambda c: c.search(c.space(**{"evaluation.num_fewshot": 100000})),
         ("space.yaml: evaluation.num_fewshot: 100000 few-shot examples asked, but task 'toy_arith' has", "use at most")),
    Case("seed-negative", lambda c: c.search(c.space(**{"search.seed": -1})),
         ("space.yaml: search.seed: seed -1 is outside 0 .. 4294967295",)),
    Case("density-range-above-one", lambda c: c.search(c.space(**{"merge.parameters.density": {"range": [0.3, 1.5]}})),
         ("space.yaml: merge.parameters.density.range: range [0.3, 1.5] reaches outside [0, 1]", "narrow it")),
    Case("density-pinned-negative", lambda c: c.search(c.space(**{"merge.parameters.density": -0.2})),
         ("space.yaml: merge.parameters.density: density -0.2 is outside [0, 1]",)),
    Case("merge-density-above-one", lambda c: ["merge", _merge_yaml(c, models=[
        {"model": str(p), "parameters": {"weight": 0.5, "density": [0.5, 1.5]}} for _, p in sorted(c.world.specialists.items())]),
        str(c.runs / "out")],
         ("merge.yaml: models[0].parameters.density[1]: density 1.5 is outside [0, 1]",)),
    Case("storage-unknown-scheme", lambda c: c.search(c.space(storage="foodb://db.example/evo")),
         ("space.yaml: storage: unknown database kind 'foodb'", "postgresql://")),
    Case("storage-sqlite-folder-missing", lambda c: c.search(c.space(storage=f"sqlite:///{c.dir}/nowhere/trials.db")),
         ("space.yaml: storage: the folder of the SQLite file", "nowhere, does not exist; create it first")),
    Case("storage-driver-missing", lambda c: c.search(c.space(storage="mysql://evo@127.0.0.1/evo")),
         ("space.yaml: storage: mysql://evo@127.0.0.1/evo needs the Python database driver 'MySQLdb'", "pip install mysqlclient")),
    Case("storage-unreachable", lambda c: c.search(c.space(storage="postgresql://evo@127.0.0.1:9/evo")),
         ("space.yaml: storage: cannot connect to postgresql://evo@127.0.0.1:9/evo", "check that the server runs")),
    Case("ray-address-http", lambda c: [*c.search(c.space()), "--ray-address", "http://127.0.0.1:8265"],
         ("--ray-address: http://127.0.0.1:8265: Ray is joined at HOST:PORT", "ray://HOST:10001", "not http://")),
    Case("ray-client-address-unreachable", lambda c: [*c.search(c.space()), "--ray-address", "ray://127.0.0.1:9"],
         ("no Ray cluster answers at ray://127.0.0.1:9 (--ray-address or workers.ray_address)", "ray status")),
    Case("runs-dir-is-a-file", lambda c: ["search", c.space(), "--runs-dir", str(_a_file(c))],
         ("--runs-dir", "notes.txt is a file, not a folder",), watch=("notes.txt",)),
    Case("workers-more-than-cores", lambda c: c.search(c.space(**{"workers.count": 1000})),
         ("space.yaml: workers.count: 1000 workers of 1 CPUs need 1000 cores; this machine has", "use count:")),
    Case("cpus-per-worker-above-cores", lambda c: c.search(c.space(**{"workers.cpus_per_worker": 4096})),
         ("space.yaml: workers.cpus_per_worker: cpus_per_worker 4096 is more than this machine's",)),
    *([Case("gpus-without-gpu", lambda c: c.search(c.space(**{"workers.gpus_per_worker": 1})),
            ("space.yaml: workers.gpus_per_worker: gpus_per_worker 1, but this machine has no GPU", "set it to 0"))]
      if _gpu_count() == 0 else []),
    Case("run-held-by-live-process", _run_held,
         ("runs/bad is being searched by pid", "one process drives a run at a time", "run the command again to resume")),
    # -- issue 9: outputs never destroy inputs ---------------------------------------------------
    Case("merge-out-is-an-input", lambda c: _merge_onto_input(c, lambda m: m["reverse"]),
         ("models/reverse is the input model", "would destroy an input"), watch=("runs", "models")),
    Case("merge-out-inside-an-input", lambda c: _merge_onto_input(c, lambda m: m["arith"] / "merged"),
         ("models/arith/merged lies inside the input model", "would destroy an input"), watch=("runs", "models")),
    Case("merge-out-contains-inputs", lambda c: _merge_onto_input(c, lambda m: m["base"].parent),
         ("contains the input model", "would destroy an input"), watch=("runs", "models")),
    Case("merge-out-is-a-file", lambda c: ["merge", _merge_yaml(c), str(_a_file(c)), "--overwrite"],
         ("notes.txt is a file; give a folder for the merged model",), watch=("runs", "notes.txt")),
    Case("export-onto-a-file", lambda c: ["export", str((_export_trial_missing(c), c.runs / "bad")[1]), "-o",
                                          str(_a_file(c))],
         ("notes.txt is a file that is not .yaml",), watch=("runs", "notes.txt")),
    Case("export-onto-a-user-yaml", lambda c: ["export", str((_export_trial_missing(c), c.runs / "bad")[1]), "-o",
                                               str(_a_file(c, "mine.yaml"))],
         ("mine.yaml exists and is not an evomerge export", "choose another file name"), watch=("runs", "mine.yaml")),
    # -- issue 9: the same model twice, the base as a donor --------------------------------------
    Case("donor-twice-two-spellings", lambda c: c.search(c.space(**{"models.donors": [
        str(c.world.specialists["arith"]), {"model": str(c.world.specialists["arith"]) + "/", "name": "arith2"}]})),
         ("space.yaml: models.donors[1].model:", "is the same folder as models.donors[0]; list each donor once")),
    Case("base-as-donor-two-spellings", lambda c: c.search(c.space(**{"models.donors": [
        str(c.world.specialists["arith"]), {"model": str(c.world.base) + "/", "name": "other"}]})),
         ("space.yaml: models.donors[1].model:", "is the base; donors are the fine-tunes of it")),
]


@pytest.fixture(scope="module")
def outcomes(toy_world, tmp_path_factory) -> dict[str, tuple[Ctx, Any, Any, list[str]]]:
    """Set every case up, then run them all through the CLI in one fresh process (cli_batch)."""
    prepared = []
    for case in CASES:
        ctx = Ctx(tmp_path_factory.mktemp(case.id), toy_world)
        args = case.setup(ctx)
        prepared.append((case, ctx, args, {w: fingerprint(ctx.dir / w) for w in case.watch}))
    batch = tmp_path_factory.mktemp("batch")
    (batch / "cases.json").write_text(json.dumps([{"id": c.id, "args": a, "cwd": str(x.dir)} for c, x, a, _ in prepared]))
    done = subprocess.run([sys.executable, "-m", "tests.reliability.cli_batch", str(batch / "cases.json"),
                           str(batch / "results.json")], check=False, cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=900)
    for lock in _HELD:
        lock.release()
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((batch / "results.json").read_text())
    return {case.id: (ctx, before, SimpleNamespace(**results[case.id]), args) for case, ctx, args, before in prepared}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_cleanly(case: Case, outcomes) -> None:
    ctx, before, result, _ = outcomes[case.id]
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert result.stderr.lstrip().startswith("error: "), result.stderr  # one message, first thing
    for text in case.expect:
        assert text.replace("runs/", str(ctx.runs) + "/", 1) in result.stderr or text in result.stderr, \
            f"{text!r} not in {result.stderr!r}"
    for watched, fingerprint_before in before.items():
        assert fingerprint(ctx.dir / watched) == fingerprint_before, f"{watched} changed"
    assert not ctx.marker.exists(), "code from the input ran"


def test_corpus_size() -> None:
    """The issue asks for a corpus; keep count of it (the closing note quotes this number)."""
    assert len(CASES) >= 75


SAME_IN_OWN_PROCESS = ("misspelled-field", "model-truncated-data", "run-exists-other-config", "show-not-a-run")


@pytest.mark.parametrize("case_id", SAME_IN_OWN_PROCESS)
def test_batch_runner_matches_a_process_of_its_own(case_id: str, outcomes) -> None:
    """The batch shares imports only: a case run alone, as a shell runs it, prints the same."""
    ctx, _, batched, args = outcomes[case_id]
    alone = evomerge(*args, cwd=ctx.dir)
    assert (alone.returncode, alone.stderr) == (batched.returncode, batched.stderr)

