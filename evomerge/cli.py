"""The ``evomerge`` command line.

Subcommands import what they need inside their bodies: ``evomerge merge`` must not pay for
importing transformers, lm-eval or ray.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from .errors import EvomergeError

STARTED = time.monotonic()  # the command's start: progress lines count their time from here


class _Group(click.Group):
    """Turns user errors into a one-line message and exit status 2, with no traceback."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except EvomergeError as err:
            click.secho(f"error: {err}", fg="red", err=True)
            sys.exit(err.exit_code)
        except Exception as err:
            from .errors import disk_full

            if not disk_full(err):
                raise
            # every write is atomic (store.write_atomic, SQLite's WAL): what was recorded stays whole
            click.secho(f"error: a write failed ({disk_full(err)}): the disk is full, or failing. Nothing recorded was "
                        "lost: free space, then run the same command again (a search resumes where it stopped)",
                        fg="red", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="evomerge")
def main() -> None:
    """Evolutionary search for LLM merge recipes."""


@main.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--shard-size", default="2GB", show_default=True, help="Largest output shard, e.g. 500MB.")
@click.option("--allow-pickle", is_flag=True, help="Also read pickled .bin weights (runs no code; tensors only).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--random-seed", type=int, default=None, help="Seed for DARE/DELLA (overrides the config's random_seed).")
@click.option("--intermediate-dir", type=click.Path(path_type=Path), default=None,
              help="Multi-stage files: keep each named stage's model in this folder "
                   "(default: a hidden sibling of OUT, removed when done).")
def merge(config: Path, out: Path, shard_size: str, allow_pickle: bool, overwrite: bool, random_seed: int | None,
          intermediate_dir: Path | None) -> None:
    """Merge models as a mergekit CONFIG describes, into the folder OUT.

    A CONFIG of several YAML documents is a multi-stage file, as mergekit-multi reads: each named
    document is merged first, and later documents use it by its name; the unnamed one is OUT.
    """
    from .quiet import quiet_libraries

    quiet_libraries()
    from .merge.config import load_merge_config
    from .merge.multi import is_multi_stage, load_stages, merge_stages
    from .merge.run import merge_config

    if is_multi_stage(config):
        stages = load_stages(config)
        out = merge_stages(stages, out, intermediate_dir=intermediate_dir, overwrite=overwrite, random_seed=random_seed,
                           shard_size=shard_size, allow_pickle=allow_pickle)
        click.echo(f"merged model written to {out} ({len(stages)} stages)")
        return
    parsed = load_merge_config(config)
    if random_seed is not None:
        parsed = parsed.model_copy(update={"random_seed": random_seed})
    out = merge_config(parsed, out, shard_size=shard_size, allow_pickle=allow_pickle, overwrite=overwrite)
    click.echo(f"merged model written to {out}")


_POOL_OPTION = click.option(
    "--pool", type=click.Choice(["ray", "inprocess"]), default=None,
    help="Where candidates run (overrides workers.pool): Ray actors, or the search process itself (no Ray).")


@main.command()
@click.argument("space", type=click.Path(path_type=Path))
@click.option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs"), show_default=True,
              help="Folder that holds run folders: the run is RUNS_DIR/<name>/ "
                   "(name: from the space file, else its stem).")
@click.option("--ray-address", default=None, help="Join an existing Ray cluster instead of starting a local one.")
@_POOL_OPTION
def search(space: Path, runs_dir: Path, ray_address: str | None, pool: str | None) -> None:
    """Search the merge space SPACE.yaml describes (resumes the run if it exists)."""
    from .interrupts import install

    install()  # first: Ctrl-C and SIGTERM stop the search cleanly from here on, whatever the shell did

    def start(report):
        from .search import search_file

        return search_file(space, runs_dir=runs_dir, ray_address=ray_address, pool=pool, report=report)

    _run_with_report(start)


@main.command()
@click.argument("space", type=click.Path(path_type=Path))
@click.option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs"), show_default=True,
              help="Where `evomerge search` would keep the run: checks that RUNS_DIR/<name> is free "
                   "or holds this config.")
@click.option("--ray-address", default=None,
              help="Check that this Ray cluster answers (as `search --ray-address` would).")
def validate(space: Path, runs_dir: Path, ray_address: str | None) -> None:
    """Dry run: check SPACE.yaml as a search does, then score the base model on one item per task.

    Nothing is written: no run folder, no runs/, no Ray cluster. Exit status 0 when a search
    would start, 2 with the reason when it would not.
    """
    from .quiet import quiet_libraries

    quiet_libraries()  # before lm-eval and datasets are imported
    from .validate import check, describe, score_base

    checked = check(space, runs_dir=runs_dir, ray_address=ray_address)
    for line in describe(checked):
        click.echo(line)
    click.echo("scoring the base model on one item of each task with lm-eval, in this process...")
    scores, items, seconds = score_base(checked)
    for task, (used, total) in items.items():
        click.echo(f"  {task}: a trial scores {used} of its {total} items")
    for name, value in scores.items():
        click.echo(f"  {name} = {value:.4g} (base, 1 item)")
    click.echo(f"valid: a search would start (the base scored one item of each of {len(items)} task(s) in "
               f"{seconds:.1f} s); nothing was written")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--ray-address", default=None, help="Join an existing Ray cluster instead of starting a local one.")
@_POOL_OPTION
def resume(run_dir: Path, ray_address: str | None, pool: str | None) -> None:
    """Continue an interrupted run from its folder, e.g. runs/toy_ties."""
    from .interrupts import install

    install()

    def start(report):
        from .search import resume as resume_run

        return resume_run(run_dir, ray_address=ray_address, pool=pool, report=report)

    _run_with_report(start)


def _run_with_report(start) -> None:
    """Run a search with a reporter on stdout (a live line on a terminal, a plain log elsewhere;
    see :mod:`evomerge.reporter`), then print the run's tables."""
    from .interrupts import Interrupted
    from .quiet import quiet_libraries
    from .reporter import make_reporter

    quiet_libraries()  # before lm-eval, datasets and transformers are imported (they read it then)
    report = make_reporter(started=STARTED)  # first: the screen is never blank while libraries load
    try:
        try:
            report.begin("loading libraries")
            path = start(report)
        finally:
            report.close()  # the live line leaves the screen before an error or the tables are printed
    except Interrupted as err:
        if err.run_dir is None:
            click.secho(f"interrupted ({err}) before the run started; nothing was recorded", fg="yellow", err=True)
        else:
            rerun = f"; {err.interrupted_trials} running trial(s) marked interrupted, run again on resume" \
                if err.interrupted_trials else ""
            click.secho(f"interrupted ({err}): every finished trial is recorded{rerun}. Resume with: "
                        f"evomerge resume {err.run_dir}", fg="yellow", err=True)
        sys.exit(err.exit_code)
    from .report import show
    from .store import RunStore

    store = RunStore.open(path)
    try:
        show(store)
    finally:
        store.close()


@main.command("show")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--top", default=5, show_default=True, help="How many best trials to list.")
def show_cmd(run_dir: Path, top: int) -> None:
    """Print a run's Pareto front, best trials and failures."""
    from .report import show
    from .store import RunStore

    store = RunStore.open(run_dir)
    try:
        show(store, top=top)
    finally:
        store.close()


@main.command("plot")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Folder for the pictures; default RUN_DIR/plots/.")
def plot_cmd(run_dir: Path, out: Path | None) -> None:
    """Draw a run's Pareto front, best so far per objective and parameter importances (HTML and PNG).

    Drawn by Optuna's visualization module from the run's trial log; needs the plot extra
    (pip install 'evomerge[plot]').
    """
    from .plots import write_plots
    from .store import RunStore

    store = RunStore.open(run_dir)
    try:
        report = write_plots(store, out)
    finally:
        store.close()
    for path in report.written:
        click.echo(path)
    for name, reason in report.skipped.items():
        click.echo(f"not drawn: {name}: {reason}")


@main.command("export")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--trial", type=int, default=None, help="Export this trial number.")
@click.option("--best", "best", is_flag=True, help="Export the best trial scored on every item (multi-fidelity: top rung only) by the weighted sum of objectives (default).")
@click.option("--pareto", is_flag=True, help="Export every trial on the Pareto front (of trials scored on every item).")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="A .yaml file (one recipe) or a folder (any number: trial_NNNNN.yaml each); "
                   "default RUN_DIR/exports/.")
def export_cmd(run_dir: Path, trial: int | None, best: bool, pareto: bool, out: Path | None) -> None:
    """Write chosen recipes as plain mergekit YAML."""
    from .errors import EvomergeError
    from .export import check_out_path, choose, export
    from .store import RunStore

    if sum([trial is not None, best, pareto]) > 1:
        raise EvomergeError("give one of --trial N, --best, --pareto")
    if out is not None:
        check_out_path(out, single=not pareto)  # before reading the run: a bad -o is the first thing said
    store = RunStore.open(run_dir)
    try:
        for path in export(store, choose(store, trial=trial, best=best, pareto=pareto), out):
            click.echo(path)
    finally:
        store.close()


@main.group()
def toy() -> None:
    """The toy world: tiny models and tasks to search over, offline."""


@toy.command("build")
@click.argument("directory", type=click.Path(path_type=Path), default=Path("toy_world"))
@click.option("--world", type=click.Choice(["pair", "compose"]), default="pair", show_default=True,
              help="pair: arith and reverse specialists; compose: shift, rotate and swap, and a task composing two.")
@click.option("--seed", type=int, default=None, help="Build seed [default: the world's own: pair 0, compose 1].")
@click.option("--force", is_flag=True, help="Rebuild even if DIRECTORY already holds a toy world.")
def toy_build(directory: Path, world: str, seed: int | None, force: bool) -> None:
    """Build a toy world's base model and specialists into DIRECTORY (its lm-eval tasks are in eval_tasks/)."""
    from .quiet import quiet_libraries

    quiet_libraries()  # transformers draws "Writing model shards" for every model saved
    from .toy.build import build_toy_world

    build_toy_world(directory, world=world, seed=seed, force=force, started=STARTED)


@toy.command("compare")
@click.argument("run_dir", type=click.Path(path_type=Path))
def toy_compare(run_dir: Path) -> None:
    """Score a run's best recipe against 50/50 linear and default TIES on the held-out split."""
    from .quiet import quiet_libraries

    quiet_libraries()  # before lm-eval and datasets are imported
    from .toy.compare import compare, print_comparison

    print_comparison(compare(run_dir))


if __name__ == "__main__":
    main()
