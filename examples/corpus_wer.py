"""WER of one corpus-v2 split broken down by synthesizer, voice and sentence source.

    asrshrink eval MODEL --data data/corpus2/test-unseen --hypotheses hyps.jsonl --json
    python examples/corpus_wer.py data/corpus2/test-unseen hyps.jsonl [--by synth voice source augment]

Joins ``asrshrink eval --hypotheses`` (id, reference, hypothesis per line) with the split's
``manifest.jsonl`` (the id is the audio file's name without suffix) and prints corpus WER per group
(word errors over reference words, as jiwer and ``asrshrink eval`` count them), plus ``--json``. For an
evaluation still to run, ``asrshrink eval MODEL --data SPLIT --by synth --by voice`` gives the same groups
at once; this script regroups saved hypotheses, and groups ``augment`` by the first step of each chain.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from asrshrink.evaluate.corpus import group_word_errors


def group_wer(split_dir: Path, hypotheses: Path, keys: list[str]) -> dict[str, dict[str, dict]]:
    manifest = [json.loads(line) for line in (split_dir / "manifest.jsonl").read_text().splitlines() if line]
    meta = {Path(row["audio_filepath"]).stem: row for row in manifest}
    hyps = [json.loads(line) for line in hypotheses.read_text().splitlines() if line]

    def value_of(key: str, row: dict) -> str:
        value = meta[row["id"]][key]
        value = value["label"].split("+")[0] if key == "augment" else value  # the chain's first step
        return "clean" if value == "" else str(value)

    return {key: group_word_errors(hyps, lambda row, key=key: value_of(key, row)) for key in keys}


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
