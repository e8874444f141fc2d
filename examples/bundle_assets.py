"""Copy a small speech sample from the synthetic corpus into the package (asrshrink/assets/speech).

    python examples/bundle_assets.py --corpus data/corpus2 --calib 200 --test 200 --test-synth 100   # corpus v2
    python examples/bundle_assets.py --corpus data/synth --calib 200 --test 200                      # corpus v1

Corpus v2 (a ``recipe.json`` with ``corpus_version`` 2): writes ``calib`` (from the corpus' ``calib`` split:
training voices, held-out sentences), ``test`` (from ``test-unseen``: voices AND sentences held out of
training) and ``test-synth`` (from ``test-heldout-synth``: a synthesizer never in training), each a folder of
Ogg/Opus files with a ``manifest.jsonl`` that keeps the corpus' synth/voice/source/augment fields. GCIDE
sentences are left out (GCIDE is GPL-2.0-or-later; the package is Apache-2.0).

Corpus v1 (LibriSpeech layout): ``calib`` from ``calib`` and ``test`` from ``test-heldout``, as LibriSpeech
trees of Ogg/Opus files with ``*.trans.txt`` transcripts.

Subsets are seeded (``--seed``). Existing sample folders are replaced. Opus at libsndfile's default level is
about 15 kB per utterance.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import soundfile as sf

from asrshrink.api import open_dataset
from asrshrink.audio.text import Vocabulary
from asrshrink.models.mlperf_rnnt import MLPERF_LABELS

VOCABULARY = Vocabulary(MLPERF_LABELS)  # the corpus transcripts' alphabet

SPLITS_V1 = {"calib": "calib", "test": "test-heldout"}
SPLITS_V2 = {"calib": "calib", "test": "test-unseen", "test-synth": "test-heldout-synth"}
#: Sentence sources whose text may not be bundled with an Apache-2.0 package.
EXCLUDED_SOURCES = {"gcide", "gcide-quotes"}


def _replace(tmp: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    data = open_dataset(out, vocabulary=VOCABULARY)
    print(f"{out}: {len(data)} utterances, {data.total_duration() / 60:.1f} min, {size / 1e6:.1f} MB")


def bundle_v1(corpus: Path, target: Path, counts: dict[str, int], seed: int) -> None:
    for name, split in SPLITS_V1.items():
        dataset = open_dataset(corpus / split, vocabulary=VOCABULARY, limit=counts[name], seed=seed)
        out = target / name
        tmp = target / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        lines: dict[Path, list[str]] = {}
        for entry, utt in zip(dataset.entries, dataset):
            speaker, chapter, _ = entry.id.split("-")
            folder = tmp / speaker / chapter
            folder.mkdir(parents=True, exist_ok=True)
            sf.write(folder / f"{entry.id}.opus", utt.audio, dataset.sample_rate, format="OGG", subtype="OPUS")
            lines.setdefault(folder / f"{speaker}-{chapter}.trans.txt", []).append(
                f"{entry.id} {entry.text.upper()}")
        for path, rows in lines.items():
            path.write_text("\n".join(sorted(rows)) + "\n")
        _replace(tmp, out)


def bundle_v2(corpus: Path, target: Path, counts: dict[str, int], seed: int) -> None:
    for name, split in SPLITS_V2.items():
        if counts.get(name, 0) <= 0:
            continue
        rows = [json.loads(line) for line in (corpus / split / "manifest.jsonl").read_text().splitlines() if line]
        allowed = [i for i, row in enumerate(rows) if row.get("source") not in EXCLUDED_SOURCES]
        rng = np.random.default_rng(seed)
        chosen = sorted(int(i) for i in rng.choice(allowed, size=min(counts[name], len(allowed)), replace=False))
        out = target / name
        tmp = target / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "audio").mkdir(parents=True)
        lines = []
        for i in chosen:
            row = dict(rows[i])
            audio, rate = sf.read(corpus / split / row["audio_filepath"], dtype="float32")
            rel = f"audio/{Path(row['audio_filepath']).stem}.opus"
            sf.write(tmp / rel, audio, rate, format="OGG", subtype="OPUS")
            row["audio_filepath"] = rel
            lines.append(json.dumps(row))
        (tmp / "manifest.jsonl").write_text("\n".join(lines) + "\n")
        _replace(tmp, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("data/corpus2"))
    parser.add_argument("--to", type=Path, default=Path("asrshrink/assets/speech"))
    parser.add_argument("--calib", type=int, default=200)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--test-synth", type=int, default=100, help="corpus v2 only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.to.mkdir(parents=True, exist_ok=True)
    recipe = args.corpus / "recipe.json"
    version = json.loads(recipe.read_text()).get("corpus_version", 1) if recipe.is_file() else 1
    counts = {"calib": args.calib, "test": args.test, "test-synth": args.test_synth}
    (bundle_v2 if version >= 2 else bundle_v1)(args.corpus, args.to, counts, args.seed)


if __name__ == "__main__":
    main()
