"""python examples/make_corpus.py OUT_DIR [--train 30000 --dev 400 --test 400 --calib 200 --test-unseen 600 --test-heldout-synth 400 --test-heldout-source 400] --seed 0 --workers 2

Synthesises asrshrink's reference speech corpus (v2) with several synthesizers and writes one folder per
split, each with a NeMo-style ``manifest.jsonl`` (``audio_filepath``, ``text``, ``duration``, plus ``synth``,
``voice``, ``source``, ``augment``) and 16 kHz FLAC files; ``OUT_DIR/recipe.json`` records every option,
figure, licence and version. Needs::

    apt-get install flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts \\
        wordnet-base fortunes fortunes-min dict-gcide bible-kjv bible-kjv-text dict-devil dict-jargon
    pip install -e ".[synth]"        # espeak-ng (GPL-3.0-or-later), used only to make data

Splits: train; dev, test, calib (seen voices, unseen sentences); test-unseen (unseen voices and sentences);
test-heldout-synth (a synthesizer never in training: Festival); test-heldout-source (a sentence source never
in training: WordNet glosses). Augmentation (speed perturbation, synthetic room impulse responses, noise at a
random SNR, band limits, gain, Opus/MP3 at low bit rates) is drawn per utterance; ``--clean SPLIT ...`` leaves
splits unaugmented. The same options and seed give the same audio whatever ``--workers`` is. The code is in
``examples/speechcorpus``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speechcorpus.augment import CLEAN  # noqa: E402
from speechcorpus.corpus import SPLITS, CorpusConfig, CorpusError, generate_corpus  # noqa: E402
from speechcorpus.engines import EngineError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = CorpusConfig()
    parser = argparse.ArgumentParser(description="Synthesise the asrshrink reference speech corpus (v2).")
    parser.add_argument("out_dir", help="output folder (one sub-folder with a manifest.jsonl per split)")
    for split, size in d.split_sizes().items():
        parser.add_argument(f"--{split}", type=int, default=size, help=f"utterances in {split} ({size})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes (0 or 1: work in this process)")
    parser.add_argument("--synth-weights", type=float, nargs=2, default=list(d.synth_weights),
                        metavar=("ESPEAK", "FLITE"), help="shares of espeak-ng and flite utterances")
    parser.add_argument("--splits", nargs="*", default=None, choices=list(SPLITS),
                        help="write only these splits (the utterances of each split do not change)")
    parser.add_argument("--clean", nargs="*", default=[], choices=list(SPLITS), help="splits left unaugmented")
    parser.add_argument("--no-augment", action="store_true", help="no augmentation at all (clean corpus)")
    parser.add_argument("--overwrite", action="store_true", help="replace split folders that already exist")
    parser.add_argument("--resume", action="store_true", help="keep audio files already written")
    return parser.parse_args(argv)


class ProgressLine:
    """One status line, rewritten at most twice a second (a plain line every 30 s when not a terminal)."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.last = 0.0
        self.tty = sys.stderr.isatty()

    def __call__(self, split: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done != total and now - self.last < (0.5 if self.tty else 30.0):
            return
        self.last = now
        line = f"{split:>20s} {done:6d}/{total:<6d} {100.0 * done / max(total, 1):5.1f}%  {now - self.start:7.0f} s"
        sys.stderr.write(("\r" + line + ("\n" if done == total else "")) if self.tty else line + "\n")
        sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = {split.replace("-", "_"): getattr(args, split.replace("-", "_")) for split in SPLITS}
    config = CorpusConfig(**sizes, seed=args.seed, synth_weights=tuple(args.synth_weights))
    if args.no_augment:
        config = replace(config, augment=CLEAN)
    augmented = [s for s in SPLITS if s not in args.clean]
    try:
        summary = generate_corpus(args.out_dir, config, workers=args.workers, splits=args.splits,
                                  augment_splits=augmented, overwrite=args.overwrite, resume=args.resume,
                                  progress=ProgressLine())
    except (CorpusError, EngineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"corpus written to {summary.root}")
    print(f"sentences per source: {summary.sentence_counts}")
    print(f"{'split':>20s} {'utts':>7s} {'voices':>7s} {'hours':>7s}  hours by synthesizer")
    for split, s in summary.splits.items():
        synths = ", ".join(f"{k} {v / 3600:.2f}" for k, v in sorted(s.by_synth.items()))
        print(f"{split:>20s} {s.utterances:7d} {len(s.by_voice):7d} {s.hours:7.2f}  {synths}")
    print(f"{'total':>20s} {sum(s.utterances for s in summary.splits.values()):7d} {'':7s} "
          f"{sum(s.hours for s in summary.splits.values()):7.2f}")
    print(f"wall time: {summary.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
