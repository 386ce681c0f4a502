"""The second toy world, ``compose``: its data and tasks are sound, its composed task needs two
skills in sequence; where it is built, its table shows that merging matters (its reduced build:
tests/toy/test_build_determinism.py)."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest

from evomerge.errors import ConfigError
from evomerge.toy import skills
from evomerge.toy.build import (
    load_toy_world,
    table_problems,
    table_tasks,
)
from evomerge.toy.tasks import EVAL_TASKS_DIR, task_name
from evomerge.toy.worlds import WORLDS, world_spec

COMPOSE = world_spec("compose")


def _word(context: str, key: str) -> str:
    assert context.startswith(f"{key}:") and context.endswith("="), context
    return context[len(key) + 1 : -1]


def _shift(word: str) -> str:  # written out, not skills.shift_letters: an independent check
    return "".join("a" if c == "z" else chr(ord(c) + 1) for c in word)


def test_compose_world_is_its_own() -> None:
    """Other skills, another seed, three specialists and a composed task with none of its own."""
    pair = world_spec("pair")
    assert not set(COMPOSE.skills) & set(pair.skills)
    assert COMPOSE.default_seed != pair.default_seed
    assert len(COMPOSE.specialists) >= 3
    assert COMPOSE.composed == ("rotate_shift",)
    with pytest.raises(ConfigError, match="no such toy world.*pair, compose"):
        world_spec("triple")


def test_skill_data_is_correct() -> None:
    for split in ("search", "heldout"):
        for context, target in skills.eval_items("shift")[split]:
            assert target == _shift(_word(context, "sft"))
        for context, target in skills.eval_items("rotate")[split]:
            word = _word(context, "rot")
            assert target == word[1:] + word[0]
        for context, target in skills.eval_items("swap")[split]:
            word = _word(context, "swp")
            assert len(target) == len(word) and sorted(target) == sorted(word)
            for i in range(0, len(word) - 1, 2):
                assert target[i : i + 2] == word[i + 1] + word[i]


def test_composed_task_needs_both_skills_in_order() -> None:
    """Every item's answer is rotate-then-shift, and neither skill alone (nor a copy) gives it:
    a model that has only one of the two skills, however perfectly, scores 0."""
    for split in ("search", "heldout"):
        for context, target in skills.eval_items("rotate_shift")[split]:
            word = _word(context, "rot>sft")
            assert target == _shift(word[1:] + word[0])
            assert target not in (_shift(word), word[1:] + word[0], word)


def test_training_never_sees_an_eval_item_nor_the_composed_instruction() -> None:
    banned = skills.eval_contexts()
    for kind in (COMPOSE.base_data, *COMPOSE.specialists):
        drawn = [c for c, _ in islice(skills.training_stream(kind, COMPOSE.default_seed), 20_000)]
        assert not set(drawn) & banned, kind
        # the composed task's instruction appears in no training data: no model is taught it
        assert not [c for c in drawn if c.startswith("rot>sft:")], kind
    base_keys = {c.split(":")[0] for c, _ in islice(skills.training_stream(COMPOSE.base_data, 1), 5000)}
    assert not {k for chain in base_keys for k in chain.split(">")} & {"sft", "rot", "swp"}


def test_tasks_load_in_lm_eval() -> None:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(EVAL_TASKS_DIR), include_defaults=False)
    tasks = manager.load(table_tasks("compose"))["tasks"]
    assert sorted(tasks) == sorted(table_tasks("compose"))
    for name, task in tasks.items():
        docs = list(task.test_docs())
        assert len(docs) == skills.EVAL_SPLITS["heldout" if name.endswith("_heldout") else "search"]
        assert task.doc_to_text(docs[0]) + task.doc_to_target(docs[0]) == docs[0]["context"] + docs[0]["target"]
    # each world's tags name its tasks alone: the pair world's tags are unchanged
    assert {"toy_compose_search", "toy_compose_heldout", "toy_search", "toy_heldout"} <= set(manager.all_tags)
    assert set(manager.load(["toy_compose_search"])["tasks"]) == {task_name(skill, "search") for skill in COMPOSE.skills}


def test_table_problems_catch_a_specialist_that_solves_the_composed_task() -> None:
    tasks = table_tasks("compose")
    good = {"base": dict.fromkeys(tasks, 0.0)}
    for skill in COMPOSE.specialists:
        good[skill] = {t: (0.9 if t in (task_name(skill, "search"), task_name(skill, "heldout")) else 0.0) for t in tasks}
    good["linear 1/3 each"] = dict.fromkeys(tasks, 0.1)
    good["task arithmetic w=1"] = dict.fromkeys(tasks, 0.6)
    assert table_problems(good, "compose") == []
    bad = json.loads(json.dumps(good))
    bad["rotate"][task_name("rotate_shift", "heldout")] = 0.4
    (problem,) = table_problems(bad, "compose")
    assert "rotate specialist" in problem and "composed task toy_rotate_shift_heldout" in problem


# --- the full world (slow; only where it is already built: a build takes minutes) ---


@pytest.fixture(scope="module")
def compose_world():
    """The full compose world at ``$EVOMERGE_TOY_COMPOSE`` or ``toy_world_compose/``, if current."""
    import os

    from tests.conftest import REPO_ROOT

    folder = Path(os.environ.get("EVOMERGE_TOY_COMPOSE", REPO_ROOT / "toy_world_compose"))
    world = load_toy_world(folder, world="compose")
    if world is None:
        pytest.skip(f"no current compose world at {folder}: build it with `evomerge toy build {folder} --world compose`")
    return world


@pytest.mark.slow
def test_full_compose_table_shows_merging_matters(compose_world) -> None:
    assert table_problems(compose_world.table, "compose") == []
    for split in ("search", "heldout"):
        task = task_name("rotate_shift", split)
        assert max(compose_world.table[s][task] for s in COMPOSE.specialists) <= compose_world.table["base"][task] + 0.05


def test_every_world_has_a_default_seed_and_tasks_on_disk() -> None:
    for world in WORLDS.values():
        for task in table_tasks(world.name):
            assert (EVAL_TASKS_DIR / f"{task}.yaml").is_file() and (EVAL_TASKS_DIR / f"{task}.jsonl").is_file()
