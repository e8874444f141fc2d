"""python examples/make_corpus.py OUT_DIR --train 20000 --dev 300 --test 300 --test-heldout 300 --calib 200 --seed 0 --workers 2 [--format flac --subtype PCM_16]

Synthesises the reference speech corpus with espeak-ng (``pip install 'asrshrink[synth]'``; sentences from
``apt-get install wordnet-base fortunes fortunes-min``) and writes it to OUT_DIR as a LibriSpeech-style tree:
``OUT_DIR/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<NNNN>.flac`` with one
``<speaker>-<chapter>.trans.txt`` per folder, ``OUT_DIR/<split>/voices.json`` (speaker id -> espeak-ng voice)
and ``OUT_DIR/recipe.json`` (options, seed, sentence counts, versions). Splits: train, dev, test and calib
(training voices, unseen sentences) and test-heldout (unseen voices and unseen sentences). The same options
and seed always give the same audio, whatever ``--workers`` is.

A small sample to ship with a package, e.g. 400 utterances in about 7 MB::

    python examples/make_corpus.py sample --train 0 --dev 0 --test 0 --calib 0 --test-heldout 400 \\
        --format OGG --subtype OPUS --compression-level 0.85
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from asrshrink.audio.synth import SPLIT_CHAPTERS, SynthConfig, generate_corpus  # noqa: E402
from asrshrink.errors import AsrshrinkError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Synthesise the asrshrink reference speech corpus.")
    parser.add_argument("out_dir", help="output folder (LibriSpeech layout)")
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--dev", type=int, default=300)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--test-heldout", type=int, default=300)
    parser.add_argument("--calib", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes (0 or 1: work in this process)")
    parser.add_argument("--format", default="FLAC", help="soundfile container: FLAC, OGG, WAV")
    parser.add_argument("--subtype", default="PCM_16", help="PCM_16, PCM_S8 (FLAC); OPUS, VORBIS (OGG)")
    parser.add_argument("--compression-level", type=float, default=None,
                        help="soundfile compression level in [0, 1] (Opus/Vorbis: higher = smaller files)")
    parser.add_argument("--heldout-voice-fraction", type=float, default=0.15)
    parser.add_argument("--splits", nargs="*", default=None, choices=list(SPLIT_CHAPTERS),
                        help="write only these splits (the utterances of each split do not change)")
    parser.add_argument("--overwrite", action="store_true", help="replace split folders that already exist")
    return parser.parse_args(argv)


class ProgressLine:
    """One status line, rewritten at most twice a second (a plain line per update when not a terminal)."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.last = 0.0
        self.tty = sys.stderr.isatty()

    def __call__(self, split: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done != total and now - self.last < (0.5 if self.tty else 30.0):
            return
        self.last = now
        line = f"{split:>12s} {done:6d}/{total:<6d} {100.0 * done / max(total, 1):5.1f}%  {now - self.start:7.0f} s"
        sys.stderr.write(("\r" + line + ("\n" if done == total else "")) if self.tty else line + "\n")
        sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = SynthConfig(train=args.train, dev=args.dev, test=args.test, test_heldout=args.test_heldout,
                         calib=args.calib, seed=args.seed, heldout_voice_fraction=args.heldout_voice_fraction,
                         audio_format=args.format, subtype=args.subtype,
                         compression_level=args.compression_level)
    start = time.monotonic()
    try:
        summary = generate_corpus(args.out_dir, config, workers=args.workers, splits=args.splits,
                                  overwrite=args.overwrite, progress=ProgressLine())
    except AsrshrinkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    wall = time.monotonic() - start
    print(f"corpus written to {summary.root}")
    print(f"sentences: {summary.sentence_counts}")
    print(f"held-out voices ({len(summary.heldout_voices)}): {', '.join(summary.heldout_voices)}")
    print(f"{'split':>12s} {'utts':>7s} {'speakers':>8s} {'hours':>8s}")
    for split, s in summary.splits.items():
        print(f"{split:>12s} {s.utterances:7d} {s.speakers:8d} {s.hours:8.3f}")
    total_h = sum(s.hours for s in summary.splits.values())
    print(f"{'total':>12s} {sum(s.utterances for s in summary.splits.values()):7d} {'':8s} {total_h:8.3f}")
    print(f"wall time: {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
