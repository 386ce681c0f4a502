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


def _simple_evaluate_scores(model, tokenizer, tasks, include_path, **kwargs) -> dict[str, float]:
    """lm-eval's own ``simple_evaluate`` on the model: the independent path the fast one must equal."""
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    results = evaluator.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16), tasks=list(tasks),
        task_manager=TaskManager(include_path=str(include_path), include_defaults=False), bootstrap_iters=0,
        log_samples=False, random_seed=None, numpy_random_seed=None, torch_random_seed=None, **kwargs)
    out = {}
    for task in tasks:
        for key, value in results["results"][task].items():
            metric, _, filter_name = key.partition(",")
            if metric != "sample_len" and not metric.endswith("_stderr") and isinstance(value, (int, float)):
                out[f"task:{task}/{metric if filter_name == 'none' else key}"] = float(value)
    return out


@pytest.mark.slow
def test_scores_equal_simple_evaluate_on_one_live_model_rewritten_in_place(toy_world) -> None:
    """The fast path (requests built once, reused for every candidate) scores what lm-eval's own
    ``simple_evaluate`` scores, on one live model whose weights change in place between calls, as
    a search worker's do; and it counts one loglikelihood request per item of these tasks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tasks = ["toy_arith", "toy_reverse"]
    samples = {"toy_arith": list(range(0, 200, 5)), "toy_reverse": list(range(3, 200, 5))}
    scorer = LmEvalScorer(tasks, include_path=toy_world.include_path, samples=samples, batch_size=16)
    tokenizer = AutoTokenizer.from_pretrained(str(toy_world.base))
    model = AutoModelForCausalLM.from_pretrained(str(toy_world.base), dtype="float32").eval()
    seen = []
    for folder in (toy_world.base, *toy_world.specialists.values(), toy_world.base):
        other = AutoModelForCausalLM.from_pretrained(str(folder), dtype="float32")
        model.load_state_dict(other.state_dict())
        fast = scorer.evaluate(model, tokenizer)
        assert fast.scores == _simple_evaluate_scores(model, tokenizer, tasks, toy_world.include_path, samples=samples)
        assert fast.cost.items == {"toy_arith": 40, "toy_reverse": 40}
        assert fast.cost.requests == {"loglikelihood": 80} and fast.cost.forward_passes == 80
        seen.append(fast.scores)
    assert seen[0] == seen[-1] and len({tuple(s.values()) for s in seen}) == 3  # each model scored as itself


def test_generation_tasks_score_as_simple_evaluate_and_count_tokens(tiny, tmp_path: Path) -> None:
    """generate_until requests: the same scores as simple_evaluate, and the tokens generated counted."""
    import shutil

    from evomerge.evaluate import EVAL_TASKS_DIR

    for name in ("toy_data.py", "toy_reverse.jsonl"):
        shutil.copy(EVAL_TASKS_DIR / name, tmp_path / name)
    text = (EVAL_TASKS_DIR / "toy_reverse.yaml").read_text().replace("task: toy_reverse", "task: toy_reverse_gen")
    text = text.replace("tag: [toy_search]\n", "").replace("output_type: loglikelihood", "output_type: generate_until")
    text = text.replace("metric: acc", "metric: exact_match")
    text += "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n"
    (tmp_path / "toy_reverse_gen.yaml").write_text(text)
    model, tokenizer = tiny
    scorer = LmEvalScorer(["toy_reverse_gen"], include_path=tmp_path, limit=6, batch_size=8)
    fast = scorer.evaluate(model, tokenizer)
    assert fast.scores == _simple_evaluate_scores(model, tokenizer, ["toy_reverse_gen"], tmp_path, limit=6)
    assert fast.cost.requests == {"generate_until": 6}
    assert 0 < fast.cost.generated_tokens <= 6 * 6


def test_options_only_simple_evaluate_knows_take_its_path_with_the_same_scores(tiny) -> None:
    """An lm_eval_args key the fast path does not apply sends scoring through simple_evaluate: same
    scores, and its requests are still counted."""
    model, tokenizer = tiny
    samples = {"toy_arith": [0, 4, 9, 13]}
    fast = LmEvalScorer(["toy_arith"], samples=samples).evaluate(model, tokenizer)
    general = LmEvalScorer(["toy_arith"], samples=samples, extra_args={"write_out": False}).evaluate(model, tokenizer)
    assert general.scores == fast.scores
    assert general.cost.requests == fast.cost.requests == {"loglikelihood": 4}
    assert general.cost.items == fast.cost.items == {"toy_arith": 4}


def test_batch_size_auto_is_probed_once_per_live_model(tiny, monkeypatch) -> None:
    """lm-eval probes again on every generation call; the scorer resolves ``auto`` once."""
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = tiny
    probes = []
    real = HFLM._detect_batch_size

    def counted(self, *args, **kwargs):  # a spy: the real probe runs, its calls are counted
        probes.append(args)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HFLM, "_detect_batch_size", counted)
    scorer = LmEvalScorer(["toy_arith"], limit=4, batch_size="auto")
    first = scorer.score(model, tokenizer)
    assert scorer.score(model, tokenizer) == first
    assert len(probes) == 1
    assert isinstance(scorer._wrap(model, tokenizer).batch_size, int)
    assert first == LmEvalScorer(["toy_arith"], limit=4, batch_size=4).score(model, tokenizer)
