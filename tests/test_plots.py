"""``evomerge plot`` on a real run folder: the files Optuna draws, and what it leaves out."""

from __future__ import annotations

import struct

from click.testing import CliRunner
from optuna.distributions import FloatDistribution

from evomerge.cli import main
from evomerge.store import RunStore
from tests.runs_without_models import make_toy_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def shown(name: str, html: str) -> bool:
    """Whether ``name`` appears in a plotly page (its JSON writes '/' as \\u002f)."""
    return name in html or name.replace("/", "\\u002f") in html


def test_plot_draws_front_history_and_importances_as_html_and_png(tmp_path):
    run, config = make_toy_run(tmp_path / "runs", trials=16)
    result = CliRunner().invoke(main, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    plots = run / "plots"
    objectives = [o.key for o in config.objectives]
    stems = ["pareto_front", *(f"history_{k.replace(':', '_').replace('/', '_')}" for k in objectives), "importances"]
    for stem in stems:
        for ext in ("html", "png"):
            assert str(plots / f"{stem}.{ext}") in result.output.splitlines()
        width, height = png_size((plots / f"{stem}.png").read_bytes())
        assert width >= 600 and height >= 400
        assert (plots / f"{stem}.png").stat().st_size > 10_000  # a drawn figure, not an empty canvas
    assert "not drawn" not in result.output
    # the pages load plotly.js from beside them, so they open offline
    assert (plots / "plotly.min.js").stat().st_size > 1_000_000
    front_html = (plots / "pareto_front.html").read_text()
    assert 'src="plotly.min.js"' in front_html
    assert all(shown(k, front_html) for k in objectives)  # axes named as evomerge names objectives
    for k, stem in zip(objectives, stems[1:]):
        assert shown(k, (plots / f"{stem}.html").read_text())
    importances = (plots / "importances.html").read_text()
    store = RunStore.open(run)
    try:
        params = set(store.trials()[0].params)
        front = store.pareto()
    finally:
        store.close()
    assert len(front) >= 2
    # every coordinate the trials vary is ranked, under its coordinate name
    assert all(shown(p, importances) for p in params)


def test_one_objective_has_no_front_and_says_so(tmp_path):
    store = RunStore.create(tmp_path, "single", "name: single\n", "h", directions={"task:toy_arith/acc": "maximize"})
    dists = {"g0/*/arith/weight": FloatDistribution(0.0, 1.0), "g0/*/reverse/weight": FloatDistribution(0.0, 1.0)}
    for i in range(6):
        n = store.start_trial({"g0/*/arith/weight": i / 6, "g0/*/reverse/weight": 1 - i / 7}, dists)
        store.complete_trial(n, {"task:toy_arith/acc": (i % 4) / 4})
    store.close()
    result = CliRunner().invoke(main, ["plot", str(store.path), "-o", str(tmp_path / "pictures")])
    assert result.exit_code == 0, result.output
    assert "not drawn: pareto_front: the run has 1 objective" in result.output
    assert not (tmp_path / "pictures" / "pareto_front.html").exists()
    assert (tmp_path / "pictures" / "history_task_toy_arith_acc.png").read_bytes()[:8] == PNG_MAGIC
    assert not (store.path / "plots").exists()  # -o is where they go
