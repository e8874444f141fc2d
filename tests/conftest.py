"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: Root of the shared test fixtures: $ASRSHRINK_FIXTURES, else ../shared/fixtures next to the project root.
FIXTURES_ROOT = Path(os.environ.get("ASRSHRINK_FIXTURES")
                     or Path(__file__).resolve().parents[1].parent / "shared" / "fixtures")


@pytest.fixture(scope="session")
def mlperf_fixture_dir() -> Path:
    """The MLPerf RNN-T conformance fixture directory; fails (never skips) when it is missing."""
    path = FIXTURES_ROOT / "mlperf_rnnt"
    if not (path / "featurizer_reference.npz").is_file():
        pytest.fail(f"MLPerf RNN-T fixture not found at {path} (set ASRSHRINK_FIXTURES to the directory "
                    f"that holds mlperf_rnnt/)", pytrace=False)
    return path
