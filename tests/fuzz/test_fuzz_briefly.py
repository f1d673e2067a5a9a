"""Keeps the fuzz target working: every seed in-process, then a short atheris run.

The long runs are by hand (README.md); this only proves, within CI's time, that the target starts,
covers the seeds and finds nothing in a fixed small number of runs.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz import fuzz_parsers

HERE = Path(__file__).parent
CORPUS = HERE / "corpus"
RUNS = 20000                # 10-20 s at the rate this target runs; the time cap is only a backstop
MAX_SECONDS = 25


@pytest.mark.parametrize("seed", sorted(CORPUS.iterdir()), ids=lambda p: p.name)
def test_seed_passes_in_process(seed):
    fuzz_parsers.one_input(seed.read_bytes())


def test_fuzz_briefly(tmp_path):
    if importlib.util.find_spec("atheris") is None:
        if os.environ.get("CI"):
            pytest.fail("atheris is not installed, and CI must run the fuzz target (pip install atheris)")
        pytest.skip("atheris is not installed (pip install atheris)")
    new = tmp_path / "new"      # libFuzzer adds what it finds to its first folder: never the checked-in seeds
    new.mkdir()
    cmd = [sys.executable, str(HERE / "fuzz_parsers.py"), f"-runs={RUNS}", f"-max_total_time={MAX_SECONDS}",
           "-seed=1", "-timeout=10", f"-artifact_prefix={tmp_path}/", str(new), str(CORPUS)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, check=False,
                          timeout=MAX_SECONDS + 120)
    found = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert proc.returncode == 0 and not found, (
        f"fuzz target failed (exit {proc.returncode}, artifacts {found}):\n{proc.stderr[-4000:]}")
    assert "Done" in proc.stderr, proc.stderr[-2000:]
