"""WER grouped by a dataset's fields (asrshrink.evaluate.corpus.wer_by, eval --by)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from asrshrink.audio.datasets import open_dataset
from asrshrink.audio.text import Vocabulary
from asrshrink.cli.main import app
from asrshrink.errors import DataError
from asrshrink.evaluate.corpus import NO_VALUE, field_names, group_word_errors, wer_by
from asrshrink.models.mlperf_rnnt import MLPERF_LABELS

CHARS = Vocabulary(MLPERF_LABELS)


def dataset(tmp_path):
    rows = [{"audio_filepath": f"{i}.wav", "text": t, "synth": s} for i, (t, s) in
            enumerate([("one two three four", "espeak-ng"), ("five six", "flite"), ("seven eight", "flite")])]
    rows.append({"audio_filepath": "3.wav", "text": "nine ten"})  # no synth
    for i in range(4):
        sf.write(tmp_path / f"{i}.wav", np.zeros(1600, dtype=np.float32), 16000)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return open_dataset(tmp_path / "m.jsonl", vocabulary=CHARS)


def test_wer_by_groups_corpus_errors_per_value(tmp_path):
    data = dataset(tmp_path)
    hyps = ["one two three four", "five sex", "seven", "nine ten eleven"]
    rows = [{"id": e.id, "reference": e.text, "hypothesis": h} for e, h in zip(data.entries, hyps)]
    assert field_names(data) == ["synth"]
    out = wer_by(rows, data, ["synth"])["synth"]
    assert list(out) == sorted(["espeak-ng", "flite", NO_VALUE])
    assert out["espeak-ng"]["wer"] == 0.0 and out["espeak-ng"]["words"] == 4
    # flite: one substitution and one deletion over 4 words, counted over the group, not averaged per utterance.
    assert out["flite"] == {"utterances": 2, "words": 4, "wer": 50.0, "substitutions": 1, "deletions": 1,
                            "insertions": 0}
    assert out[NO_VALUE]["insertions"] == 1 and out[NO_VALUE]["wer"] == 50.0
    assert group_word_errors(rows, lambda row: "all")["all"]["words"] == 10


def test_unknown_field_is_refused_with_the_fields_there_are(tmp_path):
    data = dataset(tmp_path)
    with pytest.raises(DataError, match=r"no utterance has a field 'voice' .* the fields are: synth"):
        wer_by([], data, ["voice"])


def test_eval_by_reports_groups_that_add_up(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "--data", "bundled:v2/test", "--limit", "6", "--by", "synth", "--by",
                                 "voice", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for name in ("synth", "voice"):
        groups = data["by"][name]
        assert sum(g["utterances"] for g in groups.values()) == data["num_utterances"] == 6
        assert sum(g["words"] for g in groups.values()) == data["num_words"]
        errors = sum(g["substitutions"] + g["deletions"] + g["insertions"] for g in groups.values())
        assert errors == sum(data["word_errors"].values())
    assert set(data["by"]["synth"]) <= {"espeak-ng", "flite"}
    refused = runner.invoke(app, ["eval", "--data", "bundled:v2/test", "--by", "speaker"])
    assert refused.exit_code == 2 and "no utterance has a field 'speaker'" in refused.output
    assert "decoding" not in refused.output  # refused before any decoding
