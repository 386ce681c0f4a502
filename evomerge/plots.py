"""``evomerge plot``: the pictures an Optuna user looks at, drawn by Optuna from a run's study.

The trial log is an Optuna study (see :mod:`evomerge.store`), so Optuna's own visualization
module draws it; evomerge only chooses the pictures and where they go:

- ``pareto_front``: every complete trial, the front highlighted (two or three objectives; a run
  with one objective has no front to draw, and says so). Constraint breakers are drawn apart, as
  Optuna draws any constrained study.
- ``history_<objective>``: each objective against the trial number, with its best so far. Optuna
  draws a best-so-far line only for a single-objective study, so each objective is copied into
  an in-memory single-objective study of its own (same trial numbers, same direction).
- ``importances``: fANOVA parameter importances for every objective (seeded, so the same run
  draws the same bars; fANOVA measures variance explained, so it needs no direction, where
  Optuna 5's default PED-ANOVA ranks parameters for low values only).

Each picture is written twice: HTML from the plotly version (interactive; ``plotly.min.js`` is
written once beside the pages, so they open offline) and PNG from the matplotlib version.
plotly's own PNG export needs kaleido, which drives a Chrome binary it finds or downloads; the
matplotlib renderer (Agg) needs nothing outside Python, so PNGs work on a server, in CI and
offline. plotly and matplotlib are the optional ``plot`` extra.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import EvomergeError

PLOTS_DIR = "plots"


@dataclass
class PlotReport:
    """What :func:`write_plots` wrote, and each picture it could not draw with the reason."""

    written: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _imports() -> tuple[Any, Any]:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display; PNG through the Agg renderer
        import matplotlib.pyplot as plt
        import plotly  # noqa: F401
    except ImportError as err:
        raise EvomergeError(
            f"`evomerge plot` needs plotly and matplotlib ({err.name} is missing); install them with "
            "pip install 'evomerge[plot]'"
        ) from None
    import optuna

    return optuna, plt


def slug(name: str) -> str:
    """A file-name part for an objective name: ``task:toy_arith/acc`` -> ``task_toy_arith_acc``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def write_plots(store: Any, out_dir: Path | None = None) -> PlotReport:
    """Draw the run in ``store`` into ``out_dir`` (default ``<run>/plots``): HTML and PNG per picture."""
    optuna, plt = _imports()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per in-memory study
    out_dir = Path(out_dir) if out_dir is not None else store.path / PLOTS_DIR
    study = store.study_for(optuna.samplers.RandomSampler(seed=0))
    names = list(store.directions)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise EvomergeError(f"{store.path}: no completed trial to plot yet")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = PlotReport()
    vis, vis_mpl = optuna.visualization, optuna.visualization.matplotlib

    def draw(stem: str, plotly_fig: Callable[[], Any], mpl_axes: Callable[[], Any]) -> None:
        try:
            with warnings.catch_warnings():  # the matplotlib backend is marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                fig = plotly_fig()
                axes = mpl_axes()
        except (ValueError, RuntimeError) as err:  # e.g. too few trials for importances
            report.skipped[stem] = str(err).splitlines()[0] if str(err) else type(err).__name__
            return
        html = out_dir / f"{stem}.html"
        fig.write_html(html, include_plotlyjs="directory")  # plotly.min.js once, beside the pages
        report.written.append(html)
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(9, 6)
        figure.tight_layout()
        png = out_dir / f"{stem}.png"
        figure.savefig(png, dpi=110)
        plt.close(figure)
        report.written.append(png)

    if 2 <= len(names) <= 3:
        draw("pareto_front", lambda: vis.plot_pareto_front(study), lambda: vis_mpl.plot_pareto_front(study))
    else:
        report.skipped["pareto_front"] = (
            f"the run has {len(names)} objective{'s' if len(names) != 1 else ''}; a front is drawn for 2 or 3"
        )
    for i, name in enumerate(names):
        single = _single_objective_study(optuna, study, i, name, store.directions[name])
        draw(f"history_{slug(name)}",
             lambda: vis.plot_optimization_history(single, target_name=name),
             lambda: vis_mpl.plot_optimization_history(single, target_name=name))
    importance = {"evaluator": optuna.importance.FanovaImportanceEvaluator(seed=0)}
    if len(names) == 1:
        importance["target_name"] = names[0]
    draw("importances",
         lambda: vis.plot_param_importances(study, **importance),
         lambda: vis_mpl.plot_param_importances(study, **importance))
    return report


def _single_objective_study(optuna: Any, study: Any, index: int, name: str, direction: str) -> Any:
    """Objective ``index`` of ``study`` as an in-memory single-objective study with the same trial
    numbers (every trial is copied in order; only complete ones carry a value)."""
    single = optuna.create_study(study_name=name, direction=direction)
    for t in study.get_trials(deepcopy=False):
        done = t.state == optuna.trial.TrialState.COMPLETE
        single.add_trial(optuna.trial.create_trial(
            state=t.state if done else optuna.trial.TrialState.FAIL,
            value=t.values[index] if done else None,
            params=t.params, distributions=t.distributions,
        ))
    return single
