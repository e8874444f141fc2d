"""The speech sample made from corpus v2 (examples/bundle_assets.py)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import soundfile as sf

from asrshrink.api import open_dataset
from asrshrink.audio.text import Vocabulary
from asrshrink.models.mlperf_rnnt import MLPERF_LABELS
from bundle_assets import bundle_v2, write_sample_readme


def fake_corpus(root):
    rng = np.random.default_rng(0)
    for split in ("calib", "test-unseen", "test-heldout-synth"):
        (root / split / "audio" / "000").mkdir(parents=True)
        rows = []
        for i in range(6):
            rel = f"audio/000/{split}-{i:06d}.flac"
            sf.write(root / split / rel, 0.1 * rng.standard_normal(8000), 16000, subtype="PCM_16")
            rows.append({"audio_filepath": rel, "text": f"word number {i}", "duration": 0.5, "synth": "flite",
                         "voice": "slt", "source": "gcide" if i % 3 == 0 else "kjv", "augment": {"label": "clean"}})
        (root / split / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "recipe.json").write_text(json.dumps({"corpus_version": 2}))


def test_bundle_v2_writes_opus_manifests_without_gpl_sentences(tmp_path):
    fake_corpus(tmp_path / "corpus")
    target = tmp_path / "speech"
    target.mkdir()
    bundle_v2(tmp_path / "corpus", target, {"calib": 3, "test": 10, "test-synth": 2}, seed=0)
    assert sorted(p.name for p in target.iterdir()) == ["calib", "test", "test-synth"]
    sizes = {name: len(open_dataset(target / name, vocabulary=Vocabulary(MLPERF_LABELS)))
             for name in ("calib", "test", "test-synth")}
    assert sizes == {"calib": 3, "test": 4, "test-synth": 2}  # test: only the 4 non-GCIDE utterances exist
    rows = [json.loads(line) for line in (target / "test" / "manifest.jsonl").read_text().splitlines()]
    assert {r["source"] for r in rows} == {"kjv"} and all(r["audio_filepath"].endswith(".opus") for r in rows)
    assert sf.info(target / "test" / rows[0]["audio_filepath"]).subtype == "OPUS"


def test_sample_readme_counts_each_part(tmp_path):
    fake_corpus(tmp_path / "corpus")
    target = tmp_path / "speech"
    target.mkdir()
    bundle_v2(tmp_path / "corpus", target, {"calib": 3, "test": 10, "test-synth": 2}, seed=0)
    args = argparse.Namespace(corpus=tmp_path / "corpus", calib=3, test=10, test_synth=2, seed=0)
    write_sample_readme(target, args)
    text = (target / "README.md").read_text()
    assert "| `test` | test-unseen | the voices and the sentences | 4 | 0.0 | flite 4 | kjv 4 |" in text
    assert "| `calib` | calib | the sentences | 3 |" in text and "--test-synth\n2 --seed 0" in text
