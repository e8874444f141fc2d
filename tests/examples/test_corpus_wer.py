"""Per-group WER of a corpus-v2 split (examples/corpus_wer.py)."""

from __future__ import annotations

import json

import pytest

from corpus_wer import group_wer


def test_group_wer_joins_manifest_and_hypotheses(tmp_path):
    rows = [("a-0", "espeak-ng", "en", "kjv", "clean", "one two three four"),
            ("a-1", "flite", "slt", "kjv", "speed0.9+pink20dB", "five six"),
            ("a-2", "flite", "rms", "fortunes", "opus", "seven eight")]
    (tmp_path / "manifest.jsonl").write_text("".join(
        json.dumps({"audio_filepath": f"audio/000/{i}.flac", "text": t, "duration": 1.0, "synth": s, "voice": v,
                    "source": src, "augment": {"label": aug}}) + "\n" for i, s, v, src, aug, t in rows))
    hyps = [("a-0", "one two three four", "one two three four"), ("a-1", "five six", "five sex"),
            ("a-2", "seven eight", "seven")]
    (tmp_path / "h.jsonl").write_text("".join(json.dumps({"id": i, "reference": r, "hypothesis": h}) + "\n"
                                              for i, r, h in hyps))
    out = group_wer(tmp_path, tmp_path / "h.jsonl", ["synth", "voice", "augment"])
    assert {k: out["synth"]["espeak-ng"][k] for k in ("utterances", "words", "wer")} == {
        "utterances": 1, "words": 4, "wer": 0.0}
    assert out["synth"]["flite"]["wer"] == pytest.approx(50.0)  # 2 errors over 4 words
    assert out["voice"]["rms"]["wer"] == pytest.approx(50.0)
    assert set(out["augment"]) == {"clean", "speed0.9", "opus"}
