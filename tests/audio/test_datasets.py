"""Tests for asrshrink.audio.datasets: layout detection, audio reading, filters and errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from asrshrink.audio.datasets import Dataset, Entry, Utterance, open_dataset, read_audio
from asrshrink.audio.text import Vocabulary
from asrshrink.errors import DataError
from asrshrink.models.mlperf_rnnt import MLPERF_LABELS

CHARS = Vocabulary(MLPERF_LABELS)


def tone(seconds: float, rate: int = 16000, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return wave if channels == 1 else np.stack([wave] * channels, axis=1)


def write(path: Path, audio: np.ndarray, rate: int = 16000, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, rate, **kwargs)
    return path


def make_librispeech(root: Path, durations=(0.2, 0.3, 0.25), speaker="84", chapter="121123") -> Path:
    """A one-chapter LibriSpeech tree under root/dev-clean; returns the split folder."""
    split = root / "dev-clean"
    chapter_dir = split / speaker / chapter
    lines = []
    for i, d in enumerate(durations):
        utt = f"{speaker}-{chapter}-{i:04d}"
        write(chapter_dir / f"{utt}.flac", tone(d, freq=300 + 100 * i))
        lines.append(f"{utt} HELLO WORLD NUMBER {i}")
    (chapter_dir / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return split


def make_folder(root: Path, names_durations: dict[str, float]) -> Path:
    for name, d in names_durations.items():
        write(root / f"{name}.wav", tone(d))
        (root / f"{name}.txt").write_text(f"Text of {name}!\n")
    return root


def make_jsonl(root: Path, rows: list[dict]) -> Path:
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


# ------------------------------------------------------------------------------------------------- layouts


def test_librispeech_split_and_parent(tmp_path):
    split = make_librispeech(tmp_path)
    make_librispeech(tmp_path, durations=(0.1,), speaker="2277", chapter="149896")
    for path in (split, tmp_path):
        ds = open_dataset(path, vocabulary=CHARS)
        assert isinstance(ds, Dataset) and ds.kind == "librispeech"
        assert [e.id for e in ds.entries] == ["2277-149896-0000", "84-121123-0000", "84-121123-0001",
                                              "84-121123-0002"]
        assert ds.entries[1].text == "hello world number zero"
        utt = ds[1]
        assert isinstance(utt, Utterance) and utt.audio.dtype == np.float32 and utt.audio.shape == (3200,)
        assert utt.duration == pytest.approx(0.2)
        assert len(list(ds)) == len(ds) == 4
        assert ds.total_duration() == pytest.approx(0.1 + 0.2 + 0.3 + 0.25)


def test_librispeech_ogg_audio_and_single_transcript_file(tmp_path):
    chapter = tmp_path / "1" / "2"
    write(chapter / "1-2-0000.ogg", tone(0.3), format="OGG", subtype="VORBIS")
    write(chapter / "1-2-0001.opus", tone(0.3), format="OGG", subtype="OPUS")
    (chapter / "1-2.trans.txt").write_text("1-2-0000 FIRST\n1-2-0001 SECOND\n")
    for path in (tmp_path, chapter / "1-2.trans.txt"):
        ds = open_dataset(path, vocabulary=CHARS)
        assert ds.kind == "librispeech" and [e.text for e in ds.entries] == ["first", "second"]
        assert abs(len(ds[0].audio) - 4800) <= 1 and abs(len(ds[1].audio) - 4800) <= 1


def test_folder_layout(tmp_path):
    make_folder(tmp_path, {"b": 0.2, "a": 0.1})
    write(tmp_path / "sub" / "c.flac", tone(0.15))
    (tmp_path / "sub" / "c.txt").write_text("Mr. Smith & 2 dogs\n")
    (tmp_path / "README.txt").write_text("not a transcript, no audio beside it")
    ds = open_dataset(tmp_path, vocabulary=CHARS)
    assert ds.kind == "folder"
    assert [e.id for e in ds.entries] == ["a", "b", "sub/c"]
    assert ds.entries[0].text == "text of a"
    assert ds.entries[2].text == "mister smith and two dogs"
    assert ds.entries[0].duration is None
    assert ds[2].audio.shape == (2400,)
    no_apostrophe = Vocabulary(labels=tuple(" abcdefghijklmnopqrstuvwxyz"), blank=27)
    (tmp_path / "a.txt").write_text("Don't stop")
    assert open_dataset(tmp_path, vocabulary=no_apostrophe).entries[0].text == "don t stop"


def test_jsonl_manifest(tmp_path):
    write(tmp_path / "audio" / "x.wav", tone(0.2))
    write(tmp_path / "y.wav", tone(0.1))
    manifest = make_jsonl(tmp_path, [
        {"audio_filepath": "audio/x.wav", "text": "First ONE", "duration": 0.2},
        {"audio_filepath": str(tmp_path / "y.wav"), "text": "second"},
        {"audio_filepath": "audio/x.wav", "text": "again"},
    ])
    ds = open_dataset(manifest, vocabulary=CHARS)
    assert ds.kind == "jsonl"
    assert [e.id for e in ds.entries] == ["x", "y", "x#3"]  # file order kept, repeated name disambiguated
    assert [e.text for e in ds.entries] == ["first one", "second", "again"]
    assert [e.duration for e in ds.entries] == [0.2, None, None]
    assert ds[1].audio.shape == (1600,)
    # A folder holding only the manifest (and audio without transcripts) opens the manifest.
    assert open_dataset(tmp_path, vocabulary=CHARS).kind == "jsonl"


def mlperf_item(fname: str, duration: float, text: str) -> dict:
    n = int(duration * 16000)
    return {"files": [{"channels": 1, "sample_rate": 16000.0, "bitrate": 16, "duration": duration,
                       "num_samples": n, "encoding": "Signed Integer PCM", "silent": False, "fname": fname,
                       "speed": 1}], "original_duration": duration, "original_num_samples": n, "transcript": text}


def test_mlperf_manifest_in_dataset_dir_and_below(tmp_path):
    items = []
    for utt, d in (("2-1-0001", 0.3), ("1-1-0000", 0.2)):  # file order, not id order
        fname = f"dev-clean-wav/{utt.split('-')[0]}/1/{utt}.wav"
        write(tmp_path / fname, tone(d), subtype="PCM_16")
        items.append(mlperf_item(fname, d, f"words of {utt}"))
    manifest = tmp_path / "dev-clean-wav.json"
    manifest.write_text(json.dumps(items))
    ds = open_dataset(manifest, vocabulary=CHARS)
    assert ds.kind == "mlperf" and [e.id for e in ds.entries] == ["2-1-0001", "1-1-0000"]
    assert [e.duration for e in ds.entries] == [0.3, 0.2]
    assert ds.entries[0].text == "words of two one one"  # "0001" is the number one
    assert ds[0].audio.shape == (4800,)
    # A copy of the manifest one level down resolves fname against the parent folder.
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "m.json").write_text(json.dumps(items))
    assert open_dataset(tmp_path / "manifests" / "m.json", vocabulary=CHARS).entries[1].audio_path == \
        tmp_path / "dev-clean-wav" / "1" / "1" / "1-1-0000.wav"


# --------------------------------------------------------------------------------------------------- audio


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampling_length_and_frequency(tmp_path, rate):
    path = write(tmp_path / f"tone{rate}.wav", tone(1.0, rate=rate, freq=440.0), rate)
    audio = read_audio(path, 16000)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - 16000) <= 1
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    peak = np.argmax(spectrum) * 16000 / len(audio)
    assert peak == pytest.approx(440.0, abs=2.0)
    assert np.max(np.abs(audio)) == pytest.approx(0.5, abs=0.02)


def test_int16_scaling_and_stereo_downmix(tmp_path):
    left = np.full(800, 16384, dtype=np.int16)
    right = np.full(800, -8192, dtype=np.int16)
    path = write(tmp_path / "st.wav", np.stack([left, right], axis=1), subtype="PCM_16")
    audio = read_audio(path)
    assert audio.shape == (800,) and audio.dtype == np.float32
    np.testing.assert_allclose(audio, (0.5 - 0.25) / 2)
    quad = write(tmp_path / "q.flac", tone(0.1, channels=4))
    np.testing.assert_allclose(read_audio(quad), tone(0.1), atol=1e-4)


# ------------------------------------------------------------------------------------------------- filters


def test_max_duration_with_manifest_and_header_durations(tmp_path):
    split = make_librispeech(tmp_path, durations=(0.2, 0.5, 0.3, 0.31))
    ds = open_dataset(split, max_duration=0.3, vocabulary=CHARS)
    assert [e.id for e in ds.entries] == ["84-121123-0000", "84-121123-0002"]  # 0.3 kept: only > drops
    assert ds.dropped["max_duration"] == 2
    assert ds.entries[0].duration == pytest.approx(0.2)
    # Manifest durations are trusted without reading the file.
    write(tmp_path / "m" / "a.wav", tone(0.1))
    manifest = make_jsonl(tmp_path / "m", [{"audio_filepath": "a.wav", "text": "a", "duration": 20.0},
                                           {"audio_filepath": "a.wav", "text": "b", "duration": 1.0}])
    ds = open_dataset(manifest, max_duration=15, vocabulary=CHARS)
    assert [e.text for e in ds.entries] == ["b"] and ds.dropped == {"empty_transcript": 0, "max_duration": 1}


def test_max_duration_removes_everything(tmp_path):
    split = make_librispeech(tmp_path, durations=(0.2, 0.3))
    with pytest.raises(DataError, match=r"all 2 utterances are longer than the maximum duration of 0.1 s"):
        open_dataset(split, max_duration=0.1, vocabulary=CHARS)


def test_limit_seed_subsets(tmp_path):
    split = make_librispeech(tmp_path, durations=[0.05] * 20)
    full = [e.id for e in open_dataset(split, vocabulary=CHARS).entries]
    a = [e.id for e in open_dataset(split, limit=5, seed=1, vocabulary=CHARS).entries]
    b = [e.id for e in open_dataset(split, limit=5, seed=1, vocabulary=CHARS).entries]
    c = [e.id for e in open_dataset(split, limit=5, seed=2, vocabulary=CHARS).entries]
    assert a == b and len(a) == 5 and a != c
    assert a == [i for i in full if i in a]  # original order kept
    assert [e.id for e in open_dataset(split, limit=50, vocabulary=CHARS).entries] == full


def test_limit_applies_after_max_duration(tmp_path):
    split = make_librispeech(tmp_path, durations=[0.05, 0.5] * 5)
    ds = open_dataset(split, max_duration=0.1, limit=3, seed=0, vocabulary=CHARS)
    assert len(ds) == 3 and all(e.duration <= 0.1 for e in ds.entries)


def test_empty_transcripts_dropped_or_kept(tmp_path, caplog):
    make_folder(tmp_path, {"a": 0.1, "b": 0.1})
    (tmp_path / "b.txt").write_text("!!! ---\n")
    with caplog.at_level(logging.WARNING):
        ds = open_dataset(tmp_path, vocabulary=CHARS)
    assert [e.id for e in ds.entries] == ["a"] and ds.dropped["empty_transcript"] == 1
    assert "dropped 1" in caplog.text
    kept = open_dataset(tmp_path, keep_empty=True, vocabulary=CHARS)
    assert [e.text for e in kept.entries] == ["text of a", ""] and kept.dropped["empty_transcript"] == 0
    (tmp_path / "a.txt").write_text("\u4f60\u597d\n")
    with pytest.raises(DataError, match="all 2 transcripts are empty"):
        open_dataset(tmp_path, vocabulary=CHARS)


# -------------------------------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="nowhere.*does not exist"):
        open_dataset(tmp_path / "nowhere", vocabulary=CHARS)


def test_no_layout_lists_accepted_layouts(tmp_path):
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(DataError, match="accepted layouts: a LibriSpeech tree.*JSONL manifest.*MLPerf"):
        open_dataset(tmp_path, vocabulary=CHARS)
    with pytest.raises(DataError, match="notes.md: not a dataset manifest; accepted layouts"):
        open_dataset(tmp_path / "notes.md", vocabulary=CHARS)
    write(tmp_path / "lonely.wav", tone(0.1))
    with pytest.raises(DataError, match="found 1 audio files but no transcripts"):
        open_dataset(tmp_path, vocabulary=CHARS)


def test_corrupt_audio_raised_lazily(tmp_path):
    make_folder(tmp_path, {"a": 0.1})
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00this is not audio")
    (tmp_path / "bad.txt").write_text("bad")
    ds = open_dataset(tmp_path, vocabulary=CHARS)  # opening does not read audio
    assert ds[0].id == "a"
    with pytest.raises(DataError, match=r"bad\.wav: cannot read audio"):
        ds[1]
    # With --max-duration the header is read at open time, with the same kind of message.
    with pytest.raises(DataError, match=r"bad\.wav: cannot read audio header"):
        open_dataset(tmp_path, max_duration=10, vocabulary=CHARS)


def test_empty_audio(tmp_path):
    write(tmp_path / "empty.wav", np.zeros(0, np.float32))
    (tmp_path / "empty.txt").write_text("silence")
    ds = open_dataset(tmp_path, vocabulary=CHARS)
    with pytest.raises(DataError, match=r"empty\.wav: audio file has no samples"):
        ds[0]
    (tmp_path / "zero.flac").write_bytes(b"")
    (tmp_path / "zero.txt").write_text("nothing")
    with pytest.raises(DataError, match=r"zero\.flac: audio file is empty \(0 bytes\)"):
        open_dataset(tmp_path, vocabulary=CHARS)[1]


def test_librispeech_line_without_audio(tmp_path):
    split = make_librispeech(tmp_path)
    (split / "84" / "121123" / "84-121123-0001.flac").unlink()
    with pytest.raises(DataError, match=r"84-121123\.trans\.txt:2: transcript line for 84-121123-0001 has no "
                                        r"audio file"):
        open_dataset(split, vocabulary=CHARS)


def test_librispeech_audio_without_line(tmp_path):
    split = make_librispeech(tmp_path)
    write(split / "84" / "121123" / "84-121123-0099.flac", tone(0.1))
    with pytest.raises(DataError, match=r"84-121123-0099\.flac: audio file has no line in 84-121123\.trans\.txt"):
        open_dataset(split, vocabulary=CHARS)


def test_folder_audio_without_txt(tmp_path):
    make_folder(tmp_path, {"a": 0.1})
    write(tmp_path / "orphan.flac", tone(0.1))
    with pytest.raises(DataError, match=r"orphan\.flac: audio file has no transcript orphan\.txt"):
        open_dataset(tmp_path, vocabulary=CHARS)


def test_malformed_jsonl_line(tmp_path):
    write(tmp_path / "a.wav", tone(0.1))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio_filepath": "a.wav", "text": "ok"}\n\n{"audio_filepath": "a.wav", "text": \n')
    with pytest.raises(DataError, match=r"m\.jsonl:3: malformed JSON"):
        open_dataset(manifest, vocabulary=CHARS)
    manifest.write_text('{"audio_filepath": "a.wav"}\n')
    with pytest.raises(DataError, match=r"m\.jsonl:1: missing text"):
        open_dataset(manifest, vocabulary=CHARS)
    manifest.write_text('{"audio_filepath": "gone.wav", "text": "x"}\n')
    with pytest.raises(DataError, match=r"m\.jsonl:1: audio file .*gone\.wav not found"):
        open_dataset(manifest, vocabulary=CHARS)


def test_malformed_mlperf_manifest(tmp_path):
    manifest = tmp_path / "dev.json"
    manifest.write_text('[{"files": [{"fname": "x.wav"}], "transcript": "a"},')
    with pytest.raises(DataError, match=r"dev\.json:1: malformed JSON"):
        open_dataset(manifest, vocabulary=CHARS)
    manifest.write_text(json.dumps([{"transcript": "a"}]))
    with pytest.raises(DataError, match=r"dev\.json: entry 0: missing files\[0\]\.fname"):
        open_dataset(manifest, vocabulary=CHARS)
    manifest.write_text(json.dumps([mlperf_item("w/x.wav", 1.0, "a")]))
    with pytest.raises(DataError, match=r"dev\.json: entry 0: audio file w/x\.wav not found"):
        open_dataset(manifest, vocabulary=CHARS)


def test_empty_manifest_and_bad_options(tmp_path):
    manifest = tmp_path / "m.json"
    manifest.write_text("[]")
    with pytest.raises(DataError, match=r"m\.json: no utterances found"):
        open_dataset(manifest, vocabulary=CHARS)
    make_folder(tmp_path / "f", {"a": 0.1})
    with pytest.raises(DataError, match="number of utterances to use must be a positive integer"):
        open_dataset(tmp_path / "f", limit=0, vocabulary=CHARS)
    with pytest.raises(DataError, match="maximum duration must be positive"):
        open_dataset(tmp_path / "f", max_duration=0, vocabulary=CHARS)


def test_entry_is_frozen(tmp_path):
    entry = Entry(id="a", audio_path=tmp_path / "a.wav", text="a", duration=None)
    with pytest.raises(AttributeError):
        entry.text = "b"


def test_fields_of_manifest_lines_and_librispeech_ids(tmp_path):
    write(tmp_path / "a.wav", tone(0.1))
    manifest = make_jsonl(tmp_path, [
        {"audio_filepath": "a.wav", "text": "one", "duration": 0.1, "synth": "flite", "speed": 0.95,
         "augment": {"label": "opus", "codec": "opus", "chain": ["x"]}, "tags": ["a"], "bad": float("nan")},
        {"audio_filepath": "a.wav", "text": "two"}])
    entries = open_dataset(manifest, vocabulary=CHARS).entries
    # Scalars kept as text, one level of nesting flattened, lists and non-finite numbers left out.
    assert entries[0].fields == (("synth", "flite"), ("speed", "0.95"), ("augment.label", "opus"),
                                 ("augment.codec", "opus"))
    assert entries[1].fields == ()
    split = make_librispeech(tmp_path / "ls", durations=(0.1,))
    assert open_dataset(split, vocabulary=CHARS).entries[0].fields == (("speaker", "84"), ("chapter", "121123"))
