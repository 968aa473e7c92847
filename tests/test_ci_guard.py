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


#: ways a test can skip itself (``mark.skip`` covers ``mark.skipif``), spelled in parts so that this file does not
#: match itself
SKIPS = ("pytest." + "skip(", "import" + "orskip(", "mark." + "skip", "mark." + "xfail")
#: skips that are not about data: (file, the skip's line as written); a GPU-only check is allowed to skip on a CPU
#: machine (the suite never depends on a GPU)
ALLOWED = {("test_extractor.py", "@pytest.mark." + 'skipif(not torch.cuda.is_available(), reason="needs CUDA")')}


def skip_lines(text: str) -> list[tuple[int, str]]:
    """(line number, stripped line) of every line of ``text`` that skips a test in one of the :data:`SKIPS` ways."""
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if any(s in line for s in SKIPS)]


@pytest.mark.parametrize("line", [
    "    pytest." + "skip('cuhk01 not found')",
    "onnx = pytest.import" + "orskip('onnx')",
    "@pytest.mark." + "skipif(not DATA.is_dir(), reason='no data')",
    "@pytest.mark." + "skip",
    "@pytest.mark." + "xfail(reason='no data')",
])
def test_guard_sees_every_way_to_skip(line):
    """The guard catches each spelling of a skip (it used to see ``pytest.skip(`` only), and not ``missing()``."""
    assert skip_lines(f"x = 1\n{line}\n") == [(2, line.strip())]
    assert not skip_lines("    missing('cuhk01 not found')\n")


def test_no_real_data_test_skips_on_its_own():
    """Every real-data test goes through conftest's ``missing()`` (which fails under CI); a bare
    ``pytest.skip``, ``importorskip``, ``skipif`` or ``mark.skip`` would let CI go green without running it. Test
    dependencies (onnx, onnxruntime, scipy, scikit-learn) are installed by the test setup: import them plainly."""
    offenders = [f"{p.name}:{i}: {line}" for p in sorted((ROOT / "tests").glob("test_*.py"))
                 if p.name != Path(__file__).name  # this file names the skips it looks for
                 for i, line in skip_lines(p.read_text()) if (p.name, line) not in ALLOWED]
    assert not offenders, f"use conftest.missing() instead of skipping: {offenders}"
