"""Shared pytest fixtures."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: see asrshrink/__init__.py

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

#: Root of the test fixtures: $ASRSHRINK_FIXTURES, else tests/fixtures (shipped with the repository, so the
#: suite runs from any clone).
FIXTURES_ROOT = Path(os.environ.get("ASRSHRINK_FIXTURES") or Path(__file__).resolve().parent / "fixtures")


@pytest.fixture(scope="session")
def mlperf_fixture_dir() -> Path:
    """The MLPerf RNN-T conformance fixture directory; fails (never skips) when it is missing."""
    path = FIXTURES_ROOT / "mlperf_rnnt"
    if not all((path / name).is_file() for name in ("featurizer_reference.npz", "rnnt_random_small.pt",
                                                    "reference_small.npz", "inputs.npz")):
        pytest.fail(f"MLPerf RNN-T fixture not found at {path} (set ASRSHRINK_FIXTURES to the directory "
                    f"that holds mlperf_rnnt/)", pytrace=False)
    return path
