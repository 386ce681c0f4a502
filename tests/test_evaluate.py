"""LmEvalScorer: scores live models on local tasks without lm-eval's side effects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.evaluate import LmEvalScorer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """An untrained toy-shaped model and its tokenizer, loaded as a user's folder would be."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.toy.tokenizer import build_tokenizer, save_tokenizer
    from evomerge.toy.train import new_model

    folder = tmp_path_factory.mktemp("tiny")
    new_model(build_tokenizer(), seed=0).save_pretrained(str(folder))
    save_tokenizer(folder)
    return AutoModelForCausalLM.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))


def test_unknown_task_names_close_matches() -> None:
    with pytest.raises(ConfigError, match=r"unknown lm-eval task 'toy_arth'.*Did you mean 'toy_arith'"):
        LmEvalScorer(["toy_arth"])


def test_missing_task_folder_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        LmEvalScorer(["toy_arith"], include_path=tmp_path / "nope")


def test_task_metadata() -> None:
    scorer = LmEvalScorer(["toy_arith", "toy_reverse_heldout"])
    assert scorer.metrics() == {"toy_arith": ("acc",), "toy_reverse_heldout": ("acc",)}
    assert scorer.num_docs("toy_arith") == 200


def test_score_names_objectives_and_leaves_global_rngs_alone(tiny) -> None:
    model, tokenizer = tiny
    scorer = LmEvalScorer(["toy_arith", "toy_reverse"], samples={"toy_arith": [0, 1, 2], "toy_reverse": [5, 6]})
    np.random.seed(123)
    torch.manual_seed(123)
    expected_np, expected_torch = np.random.rand(), torch.rand(1)
    np.random.seed(123)
    torch.manual_seed(123)
    scores = scorer.score(model, tokenizer)
    # lm-eval's default reseeds would make these draws repeat on every call: pycma would loop
    assert np.random.rand() == expected_np
    assert torch.equal(torch.rand(1), expected_torch)
    assert set(scores) == {"task:toy_arith/acc", "task:toy_reverse/acc"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())


def test_score_is_repeatable_and_tracks_the_model(tiny) -> None:
    """No response cache: changing the weights in place changes the answers."""
    model, tokenizer = tiny
    scorer = LmEvalScorer(["toy_arith"], limit=16)
    first = scorer.score(model, tokenizer)
    assert scorer.score(model, tokenizer) == first
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            model.lm_head.weight.zero_()
        # all-zero logits: every token ties, and greedy picks the lowest id (PAD), never a digit
        assert scorer.score(model, tokenizer)["task:toy_arith/acc"] == 0.0
    finally:
        model.load_state_dict(state)
    assert scorer.score(model, tokenizer) == first


def test_samples_and_limit_are_exclusive() -> None:
    with pytest.raises(ConfigError, match="either samples or limit"):
        LmEvalScorer(["toy_arith"], samples={"toy_arith": [0]}, limit=3)


def test_lm_eval_builtin_tasks_are_found_and_misspellings_named() -> None:
    """Real searches score lm-eval's own tasks (arc_challenge, gsm8k); they are indexed only when
    a task is not in the task folders (indexing them costs seconds). Datasets are not loaded here."""
    scorer = LmEvalScorer(["toy_arith", "arc_challenge"])
    assert scorer.tasks == ["toy_arith", "arc_challenge"]
    # a misspelling is checked against the same index (built once per process) and named
    with pytest.raises(ConfigError, match=r"'arc_challange'.*lm-eval's own tasks.*Did you mean 'arc_challenge'"):
        LmEvalScorer(["arc_challange"])


def test_filtered_metrics_are_named_as_scores_name_them(tiny, tmp_path: Path) -> None:
    """A task with a filter list (as gsm8k has) reports ``metric,filter``: metrics() must offer
    exactly the names score() produces, or the search's metric check would pass a name no trial has."""
    import shutil

    from evomerge.evaluate import EVAL_TASKS_DIR

    for name in ("toy_data.py", "toy_arith.jsonl"):
        shutil.copy(EVAL_TASKS_DIR / name, tmp_path / name)
    text = (EVAL_TASKS_DIR / "toy_arith.yaml").read_text().replace("task: toy_arith", "task: toy_arith_filtered")
    text = text.replace("tag: [toy_search]\n", "")
    text += "filter_list:\n  - name: first\n    filter:\n      - function: take_first\n"
    (tmp_path / "toy_arith_filtered.yaml").write_text(text)
    scorer = LmEvalScorer(["toy_arith_filtered"], include_path=tmp_path, limit=8, batch_size=8)
    assert scorer.metrics() == {"toy_arith_filtered": ("acc,first",)}
    model, tokenizer = tiny
    assert set(scorer.score(model, tokenizer)) == {"task:toy_arith_filtered/acc,first"}
