"""The ``evomerge`` command line.

Subcommands import what they need inside their bodies: ``evomerge merge`` must not pay for
importing transformers, lm-eval or ray.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import EvomergeError


class _Group(click.Group):
    """Turns user errors into a one-line message and exit status 2, with no traceback."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except EvomergeError as err:
            click.secho(f"error: {err}", fg="red", err=True)
            sys.exit(err.exit_code)


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
def merge(config: Path, out: Path, shard_size: str, allow_pickle: bool, overwrite: bool, random_seed: int | None) -> None:
    """Merge models as a mergekit CONFIG describes, into the folder OUT."""
    from .merge.config import load_merge_config
    from .merge.run import merge_config

    parsed = load_merge_config(config)
    if random_seed is not None:
        parsed = parsed.model_copy(update={"random_seed": random_seed})
    out = merge_config(parsed, out, shard_size=shard_size, allow_pickle=allow_pickle, overwrite=overwrite)
    click.echo(f"merged model written to {out}")


@main.group()
def toy() -> None:
    """The toy world: tiny models and tasks to search over, offline."""


@toy.command("build")
@click.argument("directory", type=click.Path(path_type=Path), default=Path("toy_world"))
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="Rebuild even if DIRECTORY already holds a toy world.")
def toy_build(directory: Path, seed: int, force: bool) -> None:
    """Build the toy base model, its specialists and their lm-eval tasks into DIRECTORY."""
    from .toy.build import build_toy_world

    build_toy_world(directory, seed=seed, force=force)


if __name__ == "__main__":
    main()
