"""Tests of the espeak-ng corpus generator (needs the ``synth`` extra: espeakng-loader)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import soundfile as sf

from asrshrink.audio.synth import (
    SPLIT_CHAPTERS, VARIANTS, VOICES, Espeak, SynthConfig, check_voices, clean_sentence, filter_sentences,
    generate_corpus, load_sentences, plan_corpus, read_fortune_sentences, read_wordnet_examples,
    select_heldout_voices, split_fortune,
)
from asrshrink.models.mlperf_rnnt import MLPERF_LABELS
from asrshrink.errors import DataError

# Thirty short sentences, distinct after normalisation.
SENTENCES = [
    f"{subject} {verb} the {thing} near the {place}"
    for subject, verb, thing, place in [
        ("the farmer", "painted", "old fence", "river"), ("my sister", "found", "green kite", "school"),
        ("a stranger", "carried", "heavy box", "station"), ("the teacher", "opened", "tall window", "garden"),
        ("our neighbour", "sold", "red bicycle", "market"), ("the captain", "lost", "silver key", "harbour"),
        ("his uncle", "fixed", "broken clock", "kitchen"), ("the children", "watched", "small boat", "bridge"),
        ("a doctor", "read", "long letter", "hospital"), ("the baker", "moved", "wooden table", "bakery"),
        ("the pilot", "checked", "paper map", "runway"), ("her friend", "bought", "blue scarf", "shop"),
        ("the gardener", "planted", "young tree", "wall"), ("a student", "dropped", "thick book", "library"),
        ("the singer", "forgot", "warm coat", "theatre"), ("my father", "cleaned", "dusty shelf", "door"),
        ("the driver", "parked", "white van", "church"), ("a sailor", "pulled", "wet rope", "dock"),
        ("the nurse", "carried", "clean towels", "ward"), ("the boy", "kicked", "muddy ball", "fence"),
        ("the cook", "burned", "fresh bread", "oven"), ("a painter", "hung", "bright picture", "stairs"),
        ("the miner", "lifted", "iron lamp", "tunnel"), ("her mother", "sewed", "torn shirt", "fire"),
        ("the guard", "locked", "narrow gate", "castle"), ("a tourist", "photographed", "stone statue", "square"),
        ("the clerk", "stamped", "yellow form", "counter"), ("my brother", "washed", "black car", "garage"),
        ("the hunter", "followed", "deer tracks", "forest"), ("a woman", "whistled", "happy tune", "lake"),
    ]
]

TINY = dict(train=3, dev=1, test=1, test_heldout=1, calib=1)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """The same tiny corpus made twice: once by a 2-process pool, once in this process."""
    base = tmp_path_factory.mktemp("synth")
    config = SynthConfig(**TINY, seed=3)
    pooled = generate_corpus(base / "pooled", config, workers=2, sentences=SENTENCES)
    inline = generate_corpus(base / "inline", config, workers=0, sentences=SENTENCES)
    return pooled, inline


# ---------------------------------------------------------------------------------------------------------
# Sentence sources


def test_clean_sentence_normalises_and_filters():
    assert clean_sentence("Mr. Smith paid $5 for 2 apples!") == "mister smith paid five for two apples"
    assert clean_sentence("'Tis the season,' she said.") == "tis the season she said"
    assert clean_sentence("Too short.") is None  # 2 words
    assert clean_sentence(" ".join(["word"] * 21)) is None
    assert clean_sentence(" ".join(["word"] * 20)) is not None
    assert clean_sentence("See /usr/local/bin for the files") is None  # code-like
    assert clean_sentence("Send mail to someone@example.com today please") is None
    assert clean_sentence("The xyzzy prgrm was nt found here") is None  # vowel-less word would be spelt out
    assert clean_sentence("1 2 3 4 5 6 7 8 9 10 11") is None  # mostly digits


def test_filter_sentences_dedupes_and_sorts():
    raw = ["The cat sat on the mat.", "the CAT sat on the mat", "A dog ran in the park!", "No.",
           "Zebras eat lots of grass"]
    assert filter_sentences(raw) == ["a dog ran in the park", "the cat sat on the mat", "zebras eat lots of grass"]
    assert filter_sentences(raw, max_words=5) == ["zebras eat lots of grass"]
    assert all(set(s) <= set(MLPERF_LABELS) for s in filter_sentences(raw))


def test_wordnet_and_fortune_readers(tmp_path):
    wordnet = tmp_path / "data.noun"
    wordnet.write_text(
        "  1 This software and database is provided \"as is\" and without warranty\n"
        "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived; "
        "\"the entity was seen by many people\"; \"it took the form of a cloud over the hills\"\n"
        "00002137 03 n 02 abstraction 0 | a general concept with no example\n", encoding="utf-8")
    assert read_wordnet_examples([wordnet]) == ["the entity was seen by many people",
                                                "it took the form of a cloud over the hills"]
    fortunes = tmp_path / "wisdom"
    fortunes.write_text(
        "A fool and his money are soon parted. Keep both of them safe!\n%\n"
        "He who l\x08laughs last thinks the slowest of all the people.\n"
        "\t\t-- Anonymous Author\n%\nShort.\n", encoding="utf-8")
    sentences = read_fortune_sentences([fortunes])
    assert sentences == ["A fool and his money are soon parted.", "Keep both of them safe!",
                         "He who laughs last thinks the slowest of all the people.", "Short."]
    pool = load_sentences([wordnet], [fortunes])
    assert pool.counts == {"wordnet": 2, "fortune": 3, "unique": 5}
    assert "keep both of them safe" in pool.sentences and pool.sentences == sorted(pool.sentences)


def test_split_fortune_drops_attribution_and_joins_lines():
    text = "Never put off till tomorrow\nwhat you can do today. Or\nthe day after.\n    -- Mark Twain\n"
    assert split_fortune(text) == ["Never put off till tomorrow what you can do today.", "Or the day after."]


def test_missing_sources_raise_data_error_with_fix(tmp_path):
    with pytest.raises(DataError, match="apt-get install wordnet-base fortunes"):
        load_sentences([], [])
    with pytest.raises(DataError, match="apt-get install"):
        load_sentences([tmp_path / "data.noun"], [])


# ---------------------------------------------------------------------------------------------------------
# Voices and plan


def test_voice_list_is_fixed_english_and_loads():
    assert len(VOICES) == len(set(VOICES)) == 8 * len(VARIANTS)
    assert VOICES[0] == "en" and "en-us+m3" in VOICES and "en-029+klatt4" in VOICES
    novelty = re.compile(r"whisper|croak|robosoft|Demonic|UniRobot|Tweaky", re.IGNORECASE)
    assert not [v for v in VOICES if novelty.search(v)]
    assert check_voices() == []
    assert check_voices(["en-gb"]) == ["en-gb"]  # British English is "en" in espeak-ng


def test_plan_splits_are_disjoint():
    sentences = [f"sentence number {i} is here" for i in range(600)]
    config = SynthConfig(train=2000, dev=40, test=40, test_heldout=60, calib=30, seed=7)
    plan = plan_corpus(config, filter_sentences(sentences))
    assert {s: len(u) for s, u in plan.items()} == config.split_sizes()
    heldout = set(select_heldout_voices(len(VOICES), 0.15, 7))
    assert len(heldout) == round(0.15 * len(VOICES))
    texts = {s: {u.text for u in utts} for s, utts in plan.items()}
    voices = {s: {u.speaker for u in utts} for s, utts in plan.items()}
    for split in ("dev", "test", "calib", "test-heldout"):
        assert not texts[split] & texts["train"], split
    assert not texts["dev"] & texts["test"] and not texts["calib"] & texts["test"]
    assert not (texts["dev"] | texts["test"] | texts["calib"]) & texts["test-heldout"]
    assert voices["test-heldout"] <= heldout
    for split in ("train", "dev", "test", "calib"):
        assert not voices[split] & heldout, split
    ids = [u.utt_id for utts in plan.values() for u in utts]
    assert len(ids) == len(set(ids))
    # train asks for more utterances than it has sentences: it cycles through its own pool only
    assert len(texts["train"]) == 600 - 170
    assert plan == plan_corpus(config, list(reversed(filter_sentences(sentences))))  # input order is irrelevant


# ---------------------------------------------------------------------------------------------------------
# Synthesis


def test_espeak_synthesis_is_repeatable():
    engine = Espeak()
    args = ("the quick brown fox jumps over the lazy dog", "en+f2", 160, 50, 50, 1, 1234)
    first = engine.synthesize(*args)
    engine.synthesize("something else entirely with another voice", "en-029+klatt3", 190, 70, 20, 0, 5)
    assert len(first) > engine.sample_rate  # over a second of audio at 22050 Hz
    assert np.array_equal(first, engine.synthesize(*args))


def test_pool_and_inline_generation_are_identical(corpora):
    pooled, inline = corpora
    files_a = sorted(p.relative_to(pooled.root) for p in pooled.root.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(inline.root) for p in inline.root.rglob("*") if p.is_file())
    assert files_a == files_b and len([f for f in files_a if f.suffix == ".flac"]) == 7
    for rel in files_a:
        assert (pooled.root / rel).read_bytes() == (inline.root / rel).read_bytes(), rel
    assert pooled.splits == inline.splits


def test_other_seed_changes_audio(tmp_path, corpora):
    pooled, _ = corpora
    config = SynthConfig(train=1, dev=0, test=0, test_heldout=0, calib=0, seed=4)
    other = generate_corpus(tmp_path, config, workers=0, sentences=SENTENCES)
    a = sorted((other.root / "train").rglob("*.flac"))[0]
    b = sorted((pooled.root / "train").rglob("*.flac"))
    assert all(sf.read(a)[0].shape != sf.read(f)[0].shape or not np.array_equal(sf.read(a)[0], sf.read(f)[0])
               for f in b)


def test_layout_matches_librispeech(corpora):
    pooled, _ = corpora
    root = pooled.root
    recipe = json.loads((root / "recipe.json").read_text())
    assert recipe["seed"] == 3 and recipe["audio"]["sample_rate"] == 16000
    assert recipe["versions"]["espeak-ng"].startswith("1.")
    for split, size in SynthConfig(**TINY).split_sizes().items():
        trans_files = sorted((root / split).glob("*/*/*.trans.txt"))
        assert trans_files, split
        n_lines = 0
        for trans in trans_files:
            speaker, chapter = trans.parent.parent.name, trans.parent.name
            assert trans.name == f"{speaker}-{chapter}.trans.txt"
            assert int(chapter) % 10 == SPLIT_CHAPTERS[split]
            lines = trans.read_text().splitlines()
            ids = [line.split(" ", 1)[0] for line in lines]
            assert ids == sorted(ids)
            assert sorted(p.stem for p in trans.parent.glob("*.flac")) == ids
            for line in lines:
                utt_id, text = line.split(" ", 1)
                assert re.fullmatch(rf"{speaker}-{chapter}-\d{{4}}", utt_id)
                assert text == text.upper() and set(text.lower()) <= set(MLPERF_LABELS)
                audio, rate = sf.read(trans.parent / f"{utt_id}.flac")
                info = sf.info(trans.parent / f"{utt_id}.flac")
                assert rate == 16000 and audio.ndim == 1 and info.subtype == "PCM_16"
                assert 0.8 < len(audio) / rate < 8.0
                assert 0.25 < np.abs(audio).max() < 0.95  # peak-normalised between -10 and -1 dBFS (+rounding)
                n_lines += 1
        assert n_lines == size
        voices = json.loads((root / split / "voices.json").read_text())
        assert {d.name for d in (root / split).iterdir() if d.is_dir()} == set(voices)
        for speaker, entry in voices.items():
            assert VOICES[int(speaker)] == entry["voice"]
            assert entry["parameter_ranges"]["rate_wpm"] == [130, 200]
            assert entry["held_out_from_train"] == (split == "test-heldout")


def test_written_heldout_split_shares_nothing_with_train(corpora):
    root = corpora[0].root

    def transcripts(split):
        return {line.split(" ", 1)[1] for t in (root / split).glob("*/*/*.trans.txt")
                for line in t.read_text().splitlines()}

    def speakers(split):
        return set(json.loads((root / split / "voices.json").read_text()))

    assert not transcripts("test-heldout") & transcripts("train")
    assert not speakers("test-heldout") & (speakers("train") | speakers("dev") | speakers("test"))
    assert not transcripts("dev") & transcripts("train")


def test_existing_split_needs_overwrite(corpora):
    root = corpora[1].root
    config = SynthConfig(**TINY, seed=3)
    with pytest.raises(DataError, match="already holds files"):
        generate_corpus(root, config, workers=0, sentences=SENTENCES, splits=["dev"])
    before = {p: p.read_bytes() for p in (root / "dev").rglob("*") if p.is_file()}
    generate_corpus(root, config, workers=0, sentences=SENTENCES, splits=["dev"], overwrite=True)
    assert before == {p: p.read_bytes() for p in (root / "dev").rglob("*") if p.is_file()}


def test_opus_output_option(tmp_path):
    config = SynthConfig(train=0, dev=0, test=0, test_heldout=2, calib=0, audio_format="ogg", subtype="opus",
                         compression_level=0.85)
    generate_corpus(tmp_path, config, workers=0, sentences=SENTENCES)
    files = sorted(tmp_path.rglob("*.opus"))
    assert len(files) == 2
    info = sf.info(files[0])
    assert info.samplerate == 16000 and info.channels == 1 and info.subtype == "OPUS"
    assert json.loads((tmp_path / "recipe.json").read_text())["audio"]["extension"] == ".opus"
    with pytest.raises(DataError, match="sub-type"):
        generate_corpus(tmp_path / "bad", SynthConfig(subtype="OPUS"), sentences=SENTENCES)
