"""WER of one corpus-v2 split broken down by synthesizer, voice and sentence source.

    asrshrink eval MODEL --data data/corpus2/test-unseen --hypotheses hyps.jsonl --json
    python examples/corpus_wer.py data/corpus2/test-unseen hyps.jsonl [--by synth voice source augment]

Joins ``asrshrink eval --hypotheses`` (id, reference, hypothesis per line) with the split's
``manifest.jsonl`` (the id is the audio file's name without suffix) and prints corpus WER per group
(word errors over reference words, as jiwer and ``asrshrink eval`` count them), plus ``--json``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import jiwer


def group_wer(split_dir: Path, hypotheses: Path, keys: list[str]) -> dict[str, dict[str, dict]]:
    manifest = [json.loads(line) for line in (split_dir / "manifest.jsonl").read_text().splitlines() if line]
    meta = {Path(row["audio_filepath"]).stem: row for row in manifest}
    hyps = [json.loads(line) for line in hypotheses.read_text().splitlines() if line]
    out: dict[str, dict[str, dict]] = {}
    for key in keys:
        refs: dict[str, list[str]] = defaultdict(list)
        outs: dict[str, list[str]] = defaultdict(list)
        for h in hyps:
            row = meta[h["id"]]
            value = row[key]["label"].split("+")[0] if key == "augment" else row[key]
            value = "clean" if value == "" else value
            refs[str(value)].append(h["reference"])
            outs[str(value)].append(h["hypothesis"])
        out[key] = {}
        for value in sorted(refs):
            words = sum(len(r.split()) for r in refs[value])
            wer = 100.0 * jiwer.wer(refs[value], outs[value]) if words else float("nan")
            out[key][value] = {"utterances": len(refs[value]), "words": words, "wer": round(wer, 2)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("split_dir", type=Path)
    parser.add_argument("hypotheses", type=Path)
    parser.add_argument("--by", nargs="+", default=["synth", "voice", "source"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = group_wer(args.split_dir, args.hypotheses, args.by)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for key, groups in result.items():
        print(f"by {key}:")
        for value, g in groups.items():
            print(f"  {value:32s} {g['utterances']:5d} utts {g['words']:6d} words  WER {g['wer']:6.2f} %")


if __name__ == "__main__":
    main()
