"""WER of the bundled reference model after unstructured pruning of its encoder at several sparsities, by
magnitude and by SparseGPT (and Wanda when asked), with the sparse storage size of each.

    python benchmarks/prune_table.py [--test PATH] [--calib PATH] [--sparsities 0.5 0.7 0.9]
                                     [--methods magnitude sparsegpt] [--limit N] [--out runs/prune]

Defaults: the bundled model, the bundled calibration sample (200 utterances) and the bundled held-out test
sample. Every run goes through ``asrshrink.compress.prune``, the code behind ``asrshrink prune``; each writes
its model and report under --out. Prints a Markdown table: sparsity, encoder sparse-storage ratio (bit mask +
float32 non-zeros against float32), model size in sparse storage, and per method the WER and the mean relative
output error of the pruned matrices on the calibration data (measured by the calibrated methods, magnitude
pruning's on the same inputs).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from asrshrink import api, compress  # noqa: E402
from asrshrink.config import PRUNE_METHODS, CalibConfig, PruneConfig  # noqa: E402
from asrshrink.models.checkpoint import ASSETS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--test", default=str(ASSETS / "speech" / "test"))
    parser.add_argument("--calib", default=str(ASSETS / "speech" / "calib"))
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--methods", nargs="+", default=["magnitude", "sparsegpt"], choices=PRUNE_METHODS)
    parser.add_argument("--components", nargs="+", default=["encoder"])
    parser.add_argument("--num-utterances", type=int, default=400)
    parser.add_argument("--limit", type=int, default=None, help="evaluate a seeded subset of N test utterances")
    parser.add_argument("--out", type=Path, default=Path("runs/prune"))
    args = parser.parse_args()
    model, _ = api.load_model(args.model)
    test = api.open_dataset(args.test, vocabulary=model.vocabulary, limit=args.limit)
    started = time.perf_counter()
    base = api.evaluate(model, test)
    print(f"original: WER {base.wer:.2f} % on {base.num_utterances} utterances ({base.num_words} words)", flush=True)
    rows = []
    for sparsity in args.sparsities:
        row = {"sparsity": sparsity}
        for method in args.methods:
            config = PruneConfig(sparsity=sparsity, method=method, components=tuple(args.components))
            out = args.out / f"{method}-{sparsity}"
            report = compress.prune(model=args.model, out=out, config=config,
                                    calib=CalibConfig(path=args.calib, num_utterances=args.num_utterances)
                                    if config.calibrated else None)
            pruned, _ = api.load_model(out)
            result = api.evaluate(pruned, test)
            errors = [r["error"] for r in report["layers"] if r["error"] is not None]
            if errors:  # a calibrated run also measures magnitude pruning's error on the same inputs
                reference = [r["error_magnitude"] for r in report["layers"] if r["error"] is not None]
                row["magnitude_error"] = sum(reference) / len(reference)
                row[f"{method}_error"] = sum(errors) / len(errors)
            row.update({f"{method}_wer": result.wer, f"{method}_seconds": report["seconds"],
                        "encoder_ratio": report["compression_ratio"]["storage"]["by_component"]["encoder"],
                        "sparse_mb": report["after"]["sparse_bytes"] / 1e6})
            print(f"sparsity {sparsity} {method}: WER {result.wer:.2f} % ({report['seconds']:.0f} s)", flush=True)
        rows.append(row)
    errors = [m for m in args.methods if m != "magnitude"]
    errors = (["magnitude"] if errors else []) + errors
    header = ["sparsity", "encoder storage ratio", "model MB (sparse)"] + [f"WER {m}" for m in args.methods] + [
        f"matrix error {m}" for m in errors]
    print()
    print(f"Original model: WER {base.wer:.2f} % on {test.source} ({base.num_utterances} utterances), "
          f"{api.describe(model)['bytes'] / 1e6:.2f} MB float32. Total time {time.perf_counter() - started:.0f} s.")
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + " ---: |" * len(header))
    for row in rows:
        cells = [f"{row['sparsity']:g}", f"{row['encoder_ratio']:.2f}", f"{row['sparse_mb']:.2f}"]
        cells += [f"{row[f'{m}_wer']:.2f}" for m in args.methods]
        cells += [f"{row[f'{m}_error']:.4f}" for m in errors]
        print("| " + " | ".join(cells) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.json").write_text(json.dumps({"original_wer": base.wer, "test": str(test.source),
                                                     "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
