"""The toy world: its tokenizer, data, tasks and training are deterministic and sound, and the
built world (slow) shows that merging matters."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest
import torch

from evomerge.errors import ModelError
from evomerge.toy import skills
from evomerge.toy.build import (
    HAND_WEIGHT,
    build_toy_world,
    load_toy_world,
    table_problems,
    table_tasks,
)
from evomerge.toy.tasks import EVAL_TASKS_DIR, eval_task_files, task_name
from evomerge.toy.tokenizer import build_tokenizer, save_tokenizer
from evomerge.toy.train import TrainSettings, new_model, train


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(folder)
    return folder


def test_tokenizer_is_one_token_per_character_with_bos(tokenizer_folder: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    ids = tok("rev:ab c=c ba")["input_ids"]  # spaces are characters too
    assert ids[0] == tok.bos_token_id
    assert len(ids) == 1 + len("rev:ab c=c ba")
    assert tok.decode(ids, skip_special_tokens=True) == "rev:ab c=c ba"
    # concatenation splits where the text does: lm-eval's context/continuation split is exact
    assert tok("neg:123=876", add_special_tokens=False)["input_ids"] == (
        tok("neg:123=", add_special_tokens=False)["input_ids"] + tok("876", add_special_tokens=False)["input_ids"]
    )
    config = json.loads((tokenizer_folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_lm_eval_hflm_sees_bos(tokenizer_folder: Path) -> None:
    """lm-eval adds no BOS of its own: the tokenizer must, in both of HFLM's encode paths."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    lm = HFLM(pretrained=new_model(tok, 0), tokenizer=tok, batch_size=2, device="cpu")
    assert lm.tok_encode("neg:375=")[0] == tok.bos_token_id
    batch, mask = lm.tok_batch_encode(["neg:375=", "rev:abc="])  # left-padded
    for row, keep in zip(batch.tolist(), mask.tolist()):
        assert row[keep.index(1)] == tok.bos_token_id


def test_committed_eval_tasks_match_the_generator() -> None:
    """eval_tasks/ is generated; regenerating must not change a byte (else run write_eval_tasks)."""
    for name, text in eval_task_files().items():
        assert (EVAL_TASKS_DIR / name).read_text(encoding="utf-8") == text, name


def test_eval_splits_are_disjoint_and_never_trained_on() -> None:
    banned = skills.eval_contexts()
    for skill in skills.SKILLS:
        splits = skills.eval_items(skill)
        search = {c for c, _ in splits["search"]}
        heldout = {c for c, _ in splits["heldout"]}
        assert len(search) == len(splits["search"]) and len(heldout) == len(splits["heldout"])
        assert not search & heldout
    for kind in (*skills.SKILLS, "base"):
        for seed in (0, 1):
            drawn = {c for c, _ in islice(skills.training_stream(kind, seed), 20_000)}
            assert not drawn & banned, kind


def test_skill_data_is_correct() -> None:
    for context, target in skills.eval_items("arith")["search"]:
        digits = context.removeprefix("neg:").removesuffix("=")
        assert int(digits) + int(target) == 10 ** len(digits) - 1 and len(target) == len(digits)
    for context, target in skills.eval_items("reverse")["search"]:
        assert context == f"rev:{target[::-1]}="


def test_training_is_deterministic() -> None:
    """Same seed, same weights: the manifest's hashes then identify a build."""
    tok = build_tokenizer()
    settings = TrainSettings(steps=3, lr=1e-3, batch_size=8, warmup=1)
    states = []
    for _ in range(2):
        model = new_model(tok, seed=7)
        train(model, tok, skills.training_stream("base", 7), settings, seed=7)
        states.append(model.state_dict())
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name
    other = new_model(tok, seed=8).state_dict()
    assert not torch.equal(other["lm_head.weight"], states[0]["lm_head.weight"])


def test_build_refuses_to_replace_a_folder_that_is_not_a_toy_world(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ModelError, match="refusing to replace"):
        build_toy_world(tmp_path, seed=0)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert load_toy_world(tmp_path) is None


def test_table_problems_names_each_failed_criterion() -> None:
    tasks = table_tasks()
    good = {
        "base": dict.fromkeys(tasks, 0.0),
        "arith": {t: (0.9 if "arith" in t else 0.0) for t in tasks},
        "reverse": {t: (0.9 if "reverse" in t else 0.0) for t in tasks},
        "linear 50/50": dict.fromkeys(tasks, 0.1),
        f"task arithmetic w={HAND_WEIGHT:g}": dict.fromkeys(tasks, 0.5),
    }
    assert table_problems(good) == []
    bad = json.loads(json.dumps(good))
    bad["linear 50/50"][task_name("arith", "heldout")] = 0.85
    bad[f"task arithmetic w={HAND_WEIGHT:g}"][task_name("reverse", "search")] = 0.3
    problems = table_problems(bad)
    assert len(problems) == 2
    assert "linear 50/50" in problems[0] and "task arithmetic" in problems[1]


# --- the built world (slow: builds it once per session unless toy_world/ is current) ---


@pytest.mark.slow
def test_built_models_load_everywhere(toy_world) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for folder in (toy_world.base, *toy_world.specialists.values()):
        assert (folder / "model.safetensors").is_file()
        assert not list(folder.glob("*.bin"))
        model = AutoModelForCausalLM.from_pretrained(str(folder))
        tok = AutoTokenizer.from_pretrained(str(folder))
        assert model.config.model_type == "llama"
        assert not model.config.tie_word_embeddings
        assert tok("neg:12=")["input_ids"][0] == tok.bos_token_id == model.config.bos_token_id


@pytest.mark.slow
def test_manifest_records_the_weights_it_describes(toy_world) -> None:
    from evomerge.toy.build import _sha256

    manifest = json.loads(toy_world.manifest_path.read_text())
    assert manifest["seed"] == 0
    for name, rel in manifest["models"].items():
        assert _sha256(toy_world.directory / rel / "model.safetensors") == manifest["sha256"][name]
    # no scratch merge folders or temp files are left in the world, nor staging folders beside it
    assert sorted(p.name for p in toy_world.directory.iterdir()) == sorted([*manifest["models"], "manifest.json"])
    assert not list(toy_world.directory.parent.glob(f".{toy_world.directory.name}.*"))


@pytest.mark.slow
def test_table_shows_that_merging_matters(toy_world) -> None:
    assert table_problems(toy_world.table) == []


@pytest.mark.slow
def test_rebuild_with_same_seed_reuses_the_world(toy_world) -> None:
    manifest = toy_world.manifest_path
    before = manifest.stat().st_mtime_ns
    again = build_toy_world(toy_world.directory, seed=0)
    assert manifest.stat().st_mtime_ns == before
    assert again.table == toy_world.table
    assert load_toy_world(toy_world.directory, seed=1) is None  # another seed would rebuild
