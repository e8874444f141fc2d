"""Copy a small speech sample from the synthetic corpus into the package (asrshrink/assets/speech).

    python examples/bundle_assets.py --corpus data/corpus2 --calib 200 --test 200 --test-synth 100   # corpus v2
    python examples/bundle_assets.py --corpus data/synth --calib 200 --test 200                      # corpus v1

Corpus v2 goes to ``asrshrink/assets/speech/v2`` (``bundled:v2/test`` ...), corpus v1 to
``asrshrink/assets/speech`` (``bundled:test``, the default of ``--data``), unless ``--to`` says otherwise.

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
from collections import Counter
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


SAMPLE_README = """# Bundled speech sample, corpus v2 (`bundled:v2/calib`, `bundled:v2/test`, `bundled:v2/test-synth`)

Written by `python examples/bundle_assets.py --corpus {corpus} --calib {calib} --test {test} --test-synth
{synth} --seed {seed}` from corpus v2 (`examples/speechcorpus/README.md`: synthesizers, sentence sources,
augmentation, licences). Ogg/Opus at libsndfile's default level; each `manifest.jsonl` keeps the corpus'
`synth`, `voice`, `source` and `augment` fields, so `examples/corpus_wer.py` can break a WER down by them.
Sentences from GCIDE (GPL-2.0-or-later) are left out; every other sentence source is public domain or under a
permissive licence, and the audio is synthesizer output.

| part | corpus split | what the models did not hear in training | utterances | minutes | synthesizers | sources |
| --- | --- | --- | ---: | ---: | --- | --- |
{rows}
"""

HELD_OUT = {"calib": "the sentences", "test": "the voices and the sentences",
            "test-synth": "the synthesizer (Festival) and the sentences"}


def _counts(rows: list[dict], key: str) -> str:
    found = Counter(row.get(key, "?") for row in rows)
    return ", ".join(f"{name} {n}" for name, n in sorted(found.items(), key=lambda kv: (-kv[1], kv[0])))


def write_sample_readme(target: Path, args: argparse.Namespace) -> None:
    rows = []
    for name, split in SPLITS_V2.items():
        manifest = target / name / "manifest.jsonl"
        if not manifest.is_file():
            continue
        entries = [json.loads(line) for line in manifest.read_text().splitlines() if line]
        minutes = sum(float(e["duration"]) for e in entries) / 60
        rows.append(f"| `{name}` | {split} | {HELD_OUT[name]} | {len(entries)} | {minutes:.1f} | "
                    f"{_counts(entries, 'synth')} | {_counts(entries, 'source')} |")
    text = SAMPLE_README.format(corpus=args.corpus, calib=args.calib, test=args.test, synth=args.test_synth,
                                seed=args.seed, rows="\n".join(rows))
    (target / "README.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("data/corpus2"))
    parser.add_argument("--to", type=Path, default=None,
                        help="default: asrshrink/assets/speech/v2 for corpus v2, asrshrink/assets/speech for v1")
    parser.add_argument("--calib", type=int, default=200)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--test-synth", type=int, default=100, help="corpus v2 only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    recipe = args.corpus / "recipe.json"
    version = json.loads(recipe.read_text()).get("corpus_version", 1) if recipe.is_file() else 1
    if args.to is None:
        args.to = Path("asrshrink/assets/speech/v2" if version >= 2 else "asrshrink/assets/speech")
    args.to.mkdir(parents=True, exist_ok=True)
    counts = {"calib": args.calib, "test": args.test, "test-synth": args.test_synth}
    (bundle_v2 if version >= 2 else bundle_v1)(args.corpus, args.to, counts, args.seed)
    if version >= 2:
        write_sample_readme(args.to, args)


if __name__ == "__main__":
    main()
