"""Safe by default: nothing user-supplied is unpickled or executed, and run-folder files are
written whole or not at all.

Source checks walk the package's syntax trees (not grep: a comment or a docstring that mentions
``torch.load`` must not count, and a call split over lines must). Behaviour checks feed the
loaders YAML that would run a command, and models that ship code which would leave a marker file.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from evomerge.errors import ConfigError

from . import broken_models as bm
from .conftest import ROOT, cli_env, good_space, write_yaml

PACKAGE = ROOT / "evomerge"
SOURCES = sorted(PACKAGE.rglob("*.py"))
# Modules that write into a run folder (runs/<name>/...): every write goes through write_atomic.
RUN_FOLDER_WRITERS = ["store", "search.py", "export.py", "report.py", "pareto.py", "recipe.py", "drivers"]


def _calls(path: Path):
    """(call node, dotted callee name, enclosing function name) for every call in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call):
                out.append((child, _dotted(child.func), inner))
            visit(child, inner)

    visit(tree, "<module>")
    return out


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _keyword(call: ast.Call, name: str) -> object:
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<expression>"
    return "<absent>"


def _where(path: Path, call: ast.Call) -> str:
    return f"{path.relative_to(ROOT)}:{call.lineno}"


def test_the_source_checks_see_calls() -> None:
    """The walker finds what the checks below look for (a check that sees nothing proves nothing)."""
    names = {name for path in SOURCES for _, name, _ in _calls(path)}
    assert {"torch.load", "yaml.safe_load", "os.replace", "write_atomic"} <= names


def test_torch_load_only_with_weights_only() -> None:
    found = [(path, call) for path in SOURCES for call, name, _ in _calls(path) if name.endswith("torch.load")]
    assert found, "model_folder.py reads --allow-pickle checkpoints with torch.load"
    for path, call in found:
        assert _keyword(call, "weights_only") is True, f"{_where(path, call)}: torch.load without weights_only=True"


def test_nothing_unpickles_or_loads_yaml_unsafely() -> None:
    banned = ("pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads", "dill.load", "dill.loads",
              "yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all",
              "numpy.load", "np.load", "joblib.load", "torch.serialization.load", "marshal.loads", "eval", "exec")
    bad = [f"{_where(path, call)}: {name}" for path in SOURCES for call, name, _ in _calls(path) if name in banned]
    assert not bad, bad
    text = "\n".join(p.read_text(encoding="utf-8") for p in SOURCES)
    assert "import pickle" not in text and "from pickle" not in text
    import yaml

    from evomerge.strict_yaml import _StrictLoader

    assert issubclass(_StrictLoader, yaml.SafeLoader)  # the strict reader of user files is safe_load's loader


def test_trust_remote_code_is_never_switched_on_in_code() -> None:
    """Every transformers call passes the space file's flag through; none hard-codes True, and the
    flag defaults to False wherever it is declared."""
    for path in SOURCES:
        for call, name, _ in _calls(path):
            assert _keyword(call, "trust_remote_code") is not True, f"{_where(path, call)}: trust_remote_code=True"
            if name.endswith("from_pretrained") and "Auto" in name and "toy" not in path.parts:  # toy: its own models
                assert _keyword(call, "trust_remote_code") != "<absent>", f"{_where(path, call)}: {name} without the flag"
    from evomerge.space_config import parse_space_config
    from evomerge.worker import WorkerSpec

    assert WorkerSpec.__dataclass_fields__["trust_remote_code"].default is False
    data = {"models": {"base": "a/b", "donors": ["a/c"]}, "merge": {"method": "task_arithmetic"},
            "objectives": [{"measure": "l2_from_base", "direction": "minimize"}], "search": {"driver": "cma", "budget": 1}}
    assert parse_space_config(data, default_name="x").trust_remote_code is False


def _run_folder_modules() -> list[Path]:
    return [p for p in SOURCES if any(part in RUN_FOLDER_WRITERS for part in p.relative_to(PACKAGE).parts)]


def test_run_folder_files_are_written_through_write_atomic() -> None:
    """No module that writes into runs/<name>/ writes a file any other way than write_atomic
    (temp name in the same folder, fsync, os.replace); trials.db is SQLite, transactional."""
    assert len(_run_folder_modules()) >= 6
    bad = []
    for path in _run_folder_modules():
        for call, name, function in _calls(path):
            if function == "write_atomic":
                continue
            method = name.rsplit(".", 1)[-1]
            if method in ("write_text", "write_bytes", "write", "writelines", "dump", "safe_dump", "copy", "copy2",
                          "copyfile", "move", "savetxt", "save", "save_file"):
                if method in ("dump", "safe_dump") and len(call.args) < 2 and _keyword(call, "stream") == "<absent>":
                    continue  # yaml/json dump to a string
                bad.append(f"{_where(path, call)}: {name}")
            if name in ("open", "io.open", "os.fdopen") or (name.endswith(".open") and name.split(".")[0] != "cls"):
                position = 1 if name in ("open", "io.open", "os.fdopen") else 0  # Path.open(mode)
                mode = call.args[position] if len(call.args) > position else None
                mode = mode.value if isinstance(mode, ast.Constant) else _keyword(call, "mode")
                if isinstance(mode, str) and mode not in ("<absent>", "<expression>") and set(mode) & set("wax+"):
                    bad.append(f"{_where(path, call)}: {name}(..., {mode!r})")
    assert not bad, bad


# -- behaviour --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/new:os.system",
                                 "!!python/name:os.system"])
def test_yaml_tags_that_would_run_code_are_refused(tag: str, tmp_path: Path) -> None:
    from evomerge.merge.config import load_merge_config
    from evomerge.space_config import load_space_config

    marker = tmp_path / "ran"
    for loader in (load_space_config, load_merge_config):
        path = tmp_path / "config.yaml"
        path.write_text(f"name: {tag} ['touch {marker}']\nmodels: {tag} ['touch {marker}']\n")
        with pytest.raises(ConfigError, match="not valid YAML"):
            loader(path)
        assert not marker.exists()


def test_pickled_weights_are_refused_unread_and_allowed_ones_run_no_code(toy_world, tmp_path: Path) -> None:
    from evomerge.errors import ModelError
    from evomerge.merge.model_folder import ModelFolder

    marker = tmp_path / "unpickled"
    folder = bm.pickled_weights(toy_world.specialists["arith"], tmp_path / "pickled", marker)
    with pytest.raises(ModelError, match="pickled .bin files"):
        ModelFolder(str(folder)).tensor_names  # noqa: B018
    with pytest.raises(ModelError, match="tensors-only checkpoint"):  # --allow-pickle: weights_only refuses it
        ModelFolder(str(folder), allow_pickle=True).tensor_names  # noqa: B018
    assert not marker.exists()


@pytest.mark.slow
def test_worker_does_not_import_model_code_unless_told(toy_world, tmp_path: Path) -> None:
    """A model of a known architecture whose config.json also points at its own code: the worker
    builds it with transformers' own class and never imports that code."""
    from evomerge.worker import CandidateEvaluator, EvalSettings, WorkerSpec

    marker = tmp_path / "imported"
    base = bm.remote_code(toy_world.base, tmp_path / "base", marker, model_type="llama")
    spec = WorkerSpec(base=str(base), donors=(str(toy_world.specialists["arith"]),),
                      evaluation=EvalSettings(tasks=("toy_arith",), include_path=(str(ROOT / "eval_tasks"),), limit=2))
    evaluator = CandidateEvaluator(spec)
    assert type(evaluator.model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()


@pytest.mark.slow
def test_space_file_opt_in_reaches_transformers(toy_world, tmp_path: Path) -> None:
    """trust_remote_code: true in the space file: the model's own code is what builds it (it runs
    here from the local folder; no Hub), and the workers are told the same."""
    marker = tmp_path / "imported"
    models = {name: str(bm.remote_code(path, tmp_path / name, marker))
              for name, path in [("base", toy_world.base), *sorted(toy_world.specialists.items())]}
    data = good_space(toy_world, trust_remote_code=True, **{
        "models.base": models.pop("base"), "models.donors": list(models.values())})
    space = write_yaml(tmp_path / "space.yaml", data)
    script = ("import sys; from evomerge.prepare import prepare, worker_spec; "
              "from evomerge.space_config import load_space_config; "
              "print('flag', worker_spec(prepare(load_space_config(sys.argv[1]))).trust_remote_code)")
    done = subprocess.run([sys.executable, "-c", script, str(space)], check=False, capture_output=True, text=True, cwd=tmp_path,
                          env=cli_env(HF_MODULES_CACHE=str(tmp_path / "modules")), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "flag True" in done.stdout
    assert marker.read_text() == "remote code ran"


def test_storage_password_never_reaches_the_run_folder(tmp_path: Path, monkeypatch) -> None:
    from evomerge.store import RunStore, expand_env, redact_url

    monkeypatch.setenv("EVOMERGE_TEST_PW", "s3cret")
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    store = RunStore.create(tmp_path / "runs", "r", "a: 1\n", "h", directions={"x": "maximize"}, storage_url=url)
    store.close()
    assert json.loads((tmp_path / "runs" / "r" / "run.json").read_text())["storage"] == url
    assert redact_url("postgresql://evo:s3cret@db:5432/evo") == "postgresql://evo:***@db:5432/evo"
    assert redact_url("postgresql://evo:${EVOMERGE_TEST_PW}@db/evo") == "postgresql://evo:${EVOMERGE_TEST_PW}@db/evo"
    assert expand_env("postgresql://evo:${EVOMERGE_TEST_PW}@db/evo") == "postgresql://evo:s3cret@db/evo"
    assert not list((tmp_path / "runs").glob(".*"))  # the folder was built aside and renamed in


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_allowed_pickled_tensors_load_in_either_torch_format(zipfile: bool, tmp_path: Path) -> None:
    """--allow-pickle reads plain tensors whichever format torch.save used (legacy cannot be mmapped)."""
    import torch

    from evomerge.merge.model_folder import ModelFolder

    tmp_path.joinpath("config.json").write_text('{"model_type": "llama", "num_hidden_layers": 1}')
    torch.save({"model.layers.0.mlp.weight": torch.ones(2, 2)}, tmp_path / "pytorch_model.bin",
               _use_new_zipfile_serialization=zipfile)
    folder = ModelFolder(str(tmp_path), allow_pickle=True)
    assert folder.tensor_names == ["model.layers.0.mlp.weight"]
    assert torch.equal(folder.read("model.layers.0.mlp.weight"), torch.ones(2, 2))
