"""Copy a small speech sample from the synthetic corpus into the package (asrshrink/assets/speech).

    python examples/bundle_assets.py --corpus data/synth --calib 200 --test 200

Writes ``asrshrink/assets/speech/calib`` (from the corpus' ``calib`` split: training voices, held-out
sentences) and ``asrshrink/assets/speech/test`` (from ``test-heldout``: voices AND sentences held out from
training), each a LibriSpeech tree of Ogg/Opus files (about 15 kB per utterance; the package must stay small)
with ``*.trans.txt`` transcripts. Subsets are seeded (``--seed``). Existing sample folders are replaced.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import soundfile as sf

from asrshrink.api import open_dataset
from asrshrink.audio.text import Vocabulary
from asrshrink.models.mlperf_rnnt import MLPERF_LABELS

SPLITS = {"calib": "calib", "test": "test-heldout"}


def bundle(corpus: Path, target: Path, counts: dict[str, int], seed: int) -> None:
    for name, split in SPLITS.items():
        dataset = open_dataset(corpus / split, vocabulary=Vocabulary(MLPERF_LABELS), limit=counts[name], seed=seed)
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
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        print(f"{out}: {len(dataset)} utterances, {dataset.total_duration() / 60:.1f} min, {size / 1e6:.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("data/synth"))
    parser.add_argument("--to", type=Path, default=Path("asrshrink/assets/speech"))
    parser.add_argument("--calib", type=int, default=200)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bundle(args.corpus, args.to, {"calib": args.calib, "test": args.test}, args.seed)


if __name__ == "__main__":
    main()
