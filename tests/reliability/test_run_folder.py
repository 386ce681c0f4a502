"""The run folder as users handle it: renamed, on a read-only or full disk; and a donor that is not
a fine-tune of the base. Each through the real CLI: a search that is killed runs in a process of its
own, the other commands through the same entry point in the test's process
(``tests/cli_inprocess.py``), without a fresh interpreter's imports for each."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.cli_inprocess import run_cli

from .conftest import fingerprint, good_space, write_yaml
from .helpers import env_with, read_run, run_to_end, write_space
from .helpers import space as toy_space

pytestmark = pytest.mark.slow


def test_a_renamed_run_folder_resumes_in_place(toy_world, tmp_path):
    # the run folder is what is tested, not where candidates run: the in-process pool, no Ray start
    cfg = write_space(tmp_path, toy_space(toy_world, budget=4, workers={"count": 2, "cpus_per_worker": 1,
                                                                           "pool": "inprocess"}))
    runs = tmp_path / "runs"
    killed = run_to_end(["search", str(cfg), "--runs-dir", str(runs)], cwd=tmp_path,
                        env=env_with("search.after_tell=kill@1"), log=tmp_path / "first.txt")
    assert killed == -9, (tmp_path / "first.txt").read_text()[-3000:]
    before, _ = read_run(runs / "faults")
    first = [r for r in before if r.state == "complete"]
    assert len(first) == 1

    (runs / "faults").rename(runs / "renamed")
    resumed = run_cli("resume", str(runs / "renamed"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in runs.iterdir()) == ["renamed"]  # never a fresh run under the old name
    records, pareto = read_run(runs / "renamed")
    complete = [r for r in records if r.state == "complete"]
    assert len(complete) == 4 == pareto["counts"]["complete"]
    assert sorted((r.attrs["generation"], r.attrs["member"]) for r in complete) == [(0, m) for m in range(4)]
    kept = next(r for r in complete if r.number == first[0].number)  # the trial before the kill, not re-run
    assert kept.recipe_json == first[0].recipe_json and kept.objectives == first[0].objectives


def _unrelated(good: Path, dest: Path) -> Path:
    """A model of the base's very shape whose matrices are random: not a fine-tune of the base."""
    shutil.copytree(good, dest)
    sd = load_file(str(dest / "model.safetensors"))
    gen = torch.Generator().manual_seed(1)
    save_file({k: (torch.randn(v.shape, generator=gen) * v.float().std()).to(v.dtype).contiguous() if v.ndim == 2 else v
               for k, v in sd.items()}, str(dest / "model.safetensors"))
    return dest


def test_a_donor_that_is_not_a_fine_tune_is_warned_of_with_its_ratio(toy_world, tmp_path):
    stranger = _unrelated(toy_world.specialists["arith"], tmp_path / "stranger")
    space = write_yaml(tmp_path / "space.yaml", good_space(toy_world, **{"models.donors": [
        str(stranger), str(toy_world.specialists["reverse"])]}))
    # an unreachable cluster stops the search right after the checks: no Ray start is needed
    done = run_cli("search", str(space), "--runs-dir", str(tmp_path / "runs"), "--ray-address", "127.0.0.1:9", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1, done.stderr  # the stranger only; the real specialists differ by about 0.12
    assert "models.donors[0]" in lines[0] and "does not look like a fine-tune of the base" in lines[0]
    ratio = float(lines[0].split("differs from the base by ")[1].split(" ")[0])
    assert 1.2 < ratio < 1.6  # two unrelated matrices of one size: about sqrt(2) apart


@contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _run_on(disk: Path, toy_world, tmp_path: Path) -> Path:
    from evomerge.search import open_store
    from evomerge.space_config import load_space_config

    space = write_yaml(tmp_path / "space.yaml", good_space(toy_world))
    open_store(load_space_config(space), disk / "runs").close()
    return space


def test_a_read_only_run_folder_is_refused_in_one_line(toy_world, tmp_path):
    with _tmpfs(tmp_path / "disk", "4m") as disk:
        space = _run_on(disk, toy_world, tmp_path)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        before = fingerprint(disk / "runs")
        done = run_cli("search", str(space), "--runs-dir", str(disk / "runs"), cwd=tmp_path)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert done.stderr.lstrip().startswith("error: ")
        assert "the run folder" in done.stderr and "is read-only" in done.stderr and "Make it writable" in done.stderr
        assert fingerprint(disk / "runs") == before


def test_a_full_disk_stops_the_search_in_one_line(toy_world, tmp_path):
    with _tmpfs(tmp_path / "disk", "4m") as disk:
        space = _run_on(disk, toy_world, tmp_path)
        trials_before = read_run(disk / "runs" / "bad")[0]
        filler = disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:  # fill every byte left
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        done = run_cli("search", str(space), "--runs-dir", str(disk / "runs"), cwd=tmp_path)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert done.stderr.lstrip().startswith("error: ")
        assert "disk is full" in done.stderr or "No space left on device" in done.stderr, done.stderr
        assert "free space" in done.stderr.lower()
        filler.unlink()
        assert read_run(disk / "runs" / "bad")[0] == trials_before  # what was recorded is whole
