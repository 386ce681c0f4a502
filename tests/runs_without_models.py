"""A real run folder in a second, without models: for tests of what a person does with a run.

The README's own space file, its real search space (coordinate names, recipes), the real run
store and the real CMA-ES driver, asked and told as the search loop does; only the scores come
from a formula of the recipe's weights instead of lm-eval (each skill rises with its donor's
weight and falls with the other's, so the front has several trials), and one trial fails, as a
candidate fault would.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.drivers import make_driver
from evomerge.objectives import ConstraintSpec, ObjectiveSpec
from evomerge.space import SearchSpace
from evomerge.space_config import SpaceConfig, load_space_config
from evomerge.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
TOY_SPACE = ROOT / "search_spaces" / "toy_ties.yaml"
TOY_LAYERS = 4  # the toy world's layer count: the space needs it, not the models


def toy_scores(values: dict, config: SpaceConfig) -> dict[str, float]:
    """``task:toy_<skill>/acc`` from the mean weight of each donor."""
    weight = {}
    for donor in config.models.donors:
        mine = [v for k, v in values.items() if f"/{donor.name}/weight" in k]
        weight[donor.name] = sum(mine) / len(mine)
    scores = {}
    for name, w in weight.items():
        others = sum(v for n, v in weight.items() if n != name) / max(1, len(weight) - 1)
        scores[f"task:toy_{name}/acc"] = round(max(0.0, min(1.0, w * (1.2 - 0.8 * others))), 4)
    return scores


def make_toy_run(runs_dir: Path, *, trials: int = 16, fail_trial: int | None = 5) -> tuple[Path, SpaceConfig]:
    """``runs_dir/toy_ties`` with ``trials`` finished trials of the README's space; returns its folder."""
    config = load_space_config(TOY_SPACE)
    space = SearchSpace.from_config(config, TOY_LAYERS)
    store = RunStore.create(
        runs_dir, config.name, config.to_yaml(), config.config_hash(),
        directions={o.key: o.direction for o in config.objectives},
        constraints={c.key: c.max for c in config.constraints if c.max is not None},
    )
    try:
        driver = make_driver(
            config.search.driver, store,
            distributions=space.optuna_distributions(),
            objectives=[ObjectiveSpec(o.key, o.direction, o.weight) for o in config.objectives],
            constraints=[ConstraintSpec(c.key, c.max) for c in config.constraints if c.max is not None],
            seed=config.search.seed, popsize=config.search.population, sigma0=config.search.sigma0,
            x0=space.initial_unit(), dim=space.unit_dimension, from_unit=space.from_unit,
        )
        done = 0
        while done < trials:
            asked = []
            while len(asked) + done < trials and (proposal := driver.ask()) is not None:
                store.annotate(proposal.number, {"recipe": space.decode(proposal.values).to_json()})
                asked.append(proposal)
            for p in asked:
                if p.number == fail_trial:
                    driver.tell(p.number, None, failed_reason="merge failed: a candidate fault, for the test")
                else:
                    driver.tell(p.number, toy_scores(dict(p.values), config),
                                attrs={"timings": {"merge_s": 0.1, "eval_s": 0.5}})
                done += 1
    finally:
        store.close()
    return runs_dir / config.name, config
