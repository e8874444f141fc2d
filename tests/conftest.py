"""Shared pytest fixtures."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: see asrshrink/__init__.py

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402

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


@pytest.fixture()
def tiny_data(tmp_path) -> Path:
    """A folder of three short noise recordings with same-name transcripts (the audio + .txt layout)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "data"
    folder.mkdir()
    for i, text in enumerate(["hello world", "a b c", "shrink me"]):
        sf.write(folder / f"u{i}.wav", (0.1 * rng.standard_normal(4000 + 1000 * i)).astype(np.float32), 16000)
        (folder / f"u{i}.txt").write_text(text)
    return folder


@pytest.fixture(scope="session")
def nemo_fixture_dir() -> Path:
    """The NeMo Conformer-Transducer conformance fixture directory; fails (never skips) when it is missing."""
    path = FIXTURES_ROOT / "nemo_conformer"
    if not all((path / layout / name).is_file() for layout in ("conformer", "fastconformer", "options")
               for name in ("model.nemo", "outputs.npz")):
        pytest.fail(f"NeMo Conformer fixture not found at {path} (set ASRSHRINK_FIXTURES to the directory "
                    f"that holds nemo_conformer/)", pytrace=False)
    return path
