"""Other libraries' progress bars stay out of evomerge's output: the toy build saves its models
with transformers, which draws "Writing model shards" for each one unless told not to."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUIET_ENVIRONMENT = ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")  # unset: a fresh shell

SAVE_A_TOY_MODEL = """
import sys
if sys.argv[1] == "quiet":
    from evomerge.quiet import quiet_libraries
    quiet_libraries()
from evomerge.toy.build import _save
from evomerge.toy.tokenizer import build_tokenizer
from evomerge.toy.train import new_model
_save(new_model(build_tokenizer(), 0), __import__("pathlib").Path(sys.argv[2]))
"""


@pytest.mark.parametrize("quiet", [False, True])
def test_saving_a_model_draws_no_progress_bar_once_libraries_are_quieted(tmp_path, quiet):
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENVIRONMENT}
    done = subprocess.run([sys.executable, "-c", SAVE_A_TOY_MODEL, "quiet" if quiet else "loud", str(tmp_path / "m")],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "m" / "model.safetensors").is_file()
    # left alone, transformers draws its bar (so this test can see one); quieted, nothing at all
    assert ("Writing model shards" in done.stderr) is not quiet, done.stderr[-2000:]
    if quiet:
        assert done.stdout == "" and done.stderr == ""
