"""Fixtures of the training-time method tests."""

import numpy as np
import pytest
import soundfile as sf


@pytest.fixture()
def speech(tmp_path):
    """Six short noise utterances with transcripts in the tiny models' vocabulary."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "speech"
    folder.mkdir()
    for i, text in enumerate(["hello world", "a b c", "shrink me", "tiny model", "more words", "last one"]):
        sf.write(folder / f"u{i}.wav", (0.1 * rng.standard_normal(4000 + 800 * i)).astype(np.float32), 16000)
        (folder / f"u{i}.txt").write_text(text)
    return folder
