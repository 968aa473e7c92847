"""Shared pytest fixtures. Keep minimal: other test files add their own fixtures."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from _trees import add_junk_and_distractors, build_market_tree, market_name


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to the real re-ID images (``../shared/data`` from the repo root, or ``$NASREID_DATA``)."""
    env = os.environ.get("NASREID_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        missing(f"shared re-ID data not found at {path} (set NASREID_DATA)")
    return path


def missing(reason: str) -> None:
    """Skip a real-data test locally; under CI (``CI=true``) a missing data folder is a failure, so a
    green CI always means the real-data tests ran."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}; CI must run the real-data tests", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_weights() -> Path:
    """Path to the real torchreid model-zoo files (``../shared/weights`` from the repo root, or
    ``$NASREID_WEIGHTS``); under CI a missing folder fails the tests that need it."""
    env = os.environ.get("NASREID_WEIGHTS")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "weights"
    if not (path / "osnet_x0_25_msmt17").is_dir():
        missing(f"pretrained weights not found at {path} (set NASREID_WEIGHTS)")
    return path


@pytest.fixture(scope="session")
def cuhk01_dir(shared_data) -> Path:
    d = shared_data / "cuhk01" / "campus"
    if not d.is_dir():
        missing(f"cuhk01 not present in {shared_data}")
    return d


@pytest.fixture
def market_root(tmp_path, cuhk01_dir) -> Path:
    """Market-1501 tree from CUHK01 ids: 6 train ids, 4 query/gallery ids, junk (-1) and distractors (0000)."""
    root = tmp_path / "market1501"
    build_market_tree(root, cuhk01_dir, market_name)
    add_junk_and_distractors(root, cuhk01_dir)
    return root


@contextlib.contextmanager
def opened_images():
    """Record every image file opened inside the context (``PIL.Image.open``: the readers of every loader go through
    it): yields the list of absolute paths, filled as files are opened."""
    import PIL.Image

    opened: list[str] = []
    orig = PIL.Image.open

    def spy(fp, *a, **k):
        opened.append(os.path.abspath(os.fspath(fp)) if isinstance(fp, (str, os.PathLike)) else repr(fp))
        return orig(fp, *a, **k)

    PIL.Image.open = spy  # type: ignore[assignment]
    try:
        yield opened
    finally:
        PIL.Image.open = orig  # type: ignore[assignment]


@pytest.fixture
def read_paths():
    """Every image file opened during the test (:func:`opened_images`)."""
    with opened_images() as opened:
        yield opened


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module's tests (tiny nets run faster so; the CPU cores are shared).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``; a module-scoped fixture that trains requests it
    as an argument, so that it runs inside it too."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def write_recipe(tmp_path, shared_data):
    """``write_recipe(base: dict, **dotted_overrides) -> Path``: a copy of ``base`` with the dataset root set to
    the real CUHK01 folder, ``output_root`` in ``tmp_path`` and ``{"a.b": v}`` overrides (dotted keys; nested
    dicts are created), written as ``tmp_path/<recipe name>.yaml``."""
    import json

    import yaml

    def make(base: dict, **over):
        d = json.loads(json.dumps(base))
        d["data"]["dataset"]["root"] = str(shared_data / "cuhk01")
        d["output_root"] = str(tmp_path / "results")
        for k, v in over.items():
            node = d
            *head, last = k.split(".")
            for kk in head:
                node = node.setdefault(kk, {})
            node[last] = v
        p = tmp_path / f"{d['name']}.yaml"
        p.write_text(yaml.safe_dump(d))
        return p
    return make
