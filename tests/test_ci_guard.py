"""Under CI (``CI=true``) a missing real-data folder fails the real-data tests instead of skipping them, so
a green CI means they ran; on a developer's machine they are skipped with the reason."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

TEST = "tests/test_datasets.py::test_cuhk01_real_protocol"
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("ci, code, word", [("true", 1, "CI must run the real-data tests"), ("", 0, "skipped")])
def test_missing_data_fails_under_ci_and_skips_otherwise(tmp_path, ci, code, word):
    env = {**os.environ, "CI": ci, "NASREID_DATA": str(tmp_path / "nowhere")}
    r = subprocess.run([sys.executable, "-m", "pytest", TEST, "-q", "-rs", "-p", "no:cacheprovider"], cwd=ROOT,
                       env=env, capture_output=True, text=True)
    assert r.returncode == code, r.stdout + r.stderr
    assert word in r.stdout


def test_no_real_data_test_skips_on_its_own():
    """Every real-data test goes through conftest's ``missing()`` (which fails under CI); a bare
    ``pytest.skip`` for a missing data folder would let CI go green without running it."""
    bare = "pytest." + "skip("  # spelled in two parts so that this file does not match itself
    offenders = [f"{p.name}:{i}" for p in sorted((ROOT / "tests").glob("test_*.py"))
                 for i, line in enumerate(p.read_text().splitlines(), 1) if bare in line]
    assert not offenders, f"use conftest.missing() instead of pytest.skip: {offenders}"
