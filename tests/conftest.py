"""Shared pytest fixtures. Keep minimal: other test files add their own fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to the real re-ID images (``../shared/data`` from the repo root, or ``$NASREID_DATA``)."""
    env = os.environ.get("NASREID_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared re-ID data not found at {path} (set NASREID_DATA)")
    return path
