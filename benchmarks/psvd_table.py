"""The PSVD paper's Table 1 on asrshrink's bundled reference model: WER after SVD and after PSVD at several
thresholds, and the same with asrshrink's additions (data-aware truncation, joint fits, refits, per-layer ranks
under the same encoder budget).

    python benchmarks/psvd_table.py [--test PATH] [--calib PATH] [--thresholds 0.1 0.2 0.4] [--out runs/table1]

Defaults: the bundled model, the bundled calibration sample (200 utterances) and the bundled held-out test
sample (voices and sentences unseen in training). Every run goes through ``asrshrink.compress.run``, the code
behind ``asrshrink svd`` / ``asrshrink psvd``; each writes its model and report under --out. Prints a Markdown
table: encoder compression ratio, WER of each method, and WER_rel = (WER_svd - WER_method) / (WER_svd -
WER_orig), the share of the WER lost to SVD that the method recovers.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from asrshrink import api, compress  # noqa: E402
from asrshrink.config import CalibConfig, SvdConfig  # noqa: E402
from asrshrink.methods.psvd import PsvdConfig  # noqa: E402
from asrshrink.models.checkpoint import ASSETS  # noqa: E402

METHODS = {
    # name: (data_aware, psvd variant or None, refits, ranks from a budget at the svd row's encoder ratio)
    "svd": (False, None, 1, False),
    "psvd": (False, "paper", 1, False),
    "psvd-joint": (False, "joint", 1, False),
    "da-svd": (True, None, 1, False),
    "da-psvd": (True, "paper", 1, False),
    "da-psvd-r3": (True, "paper", 3, False),
    "da-psvd-r3-budget": (True, "paper", 3, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--test", default=str(ASSETS / "speech" / "test"))
    parser.add_argument("--calib", default=str(ASSETS / "speech" / "calib"))
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.2, 0.4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--num-utterances", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path("runs/table1"))
    args = parser.parse_args()
    model, info = api.load_model(args.model)
    test = api.open_dataset(args.test, vocabulary=model.vocabulary)
    started = time.perf_counter()
    base = api.evaluate(model, test)
    print(f"original: WER {base.wer:.2f} % on {base.num_utterances} utterances ({base.num_words} words)", flush=True)
    rows = []
    for threshold in args.thresholds:
        row = {"threshold": threshold}
        for name in args.methods:
            data_aware, variant, refits, budget = METHODS[name]
            if budget and "ratio" not in row:
                parser.error(f"{name} needs the svd method first (it takes that row's encoder ratio)")
            out = args.out / f"{name}-{threshold}"
            svd = (SvdConfig(threshold=threshold, compression_ratio=row["ratio"], data_aware=data_aware) if budget
                   else SvdConfig(threshold=threshold, data_aware=data_aware))
            report = compress.run(
                "psvd" if variant else "svd", model=args.model, out=out, svd=svd,
                calib=CalibConfig(path=args.calib, num_utterances=args.num_utterances),
                post=PsvdConfig(iterations=args.iterations, variant=variant, refits=refits) if variant else None)
            compressed, _ = api.load_model(out)
            result = api.evaluate(compressed, test)
            ratio = report["compression_ratio"]["by_component"]["encoder"]
            row.setdefault("ratio", ratio)
            row[f"{name}_ratio"] = ratio
            row[name] = result.wer
            row[f"{name}_seconds"] = report["seconds"]
            print(f"threshold {threshold} {name}: WER {result.wer:.2f} % (encoder ratio {row['ratio']:.2f}, "
                  f"{report['seconds']:.0f} s)", flush=True)
        rows.append(row)
    header = ["threshold", "encoder CR"] + [f"WER {m}" for m in args.methods] + [
        f"WER_rel {m}" for m in args.methods if m != "svd"]
    print()
    print(f"Original model: WER {base.wer:.2f} % on {test.source} ({base.num_utterances} utterances). "
          f"Total time {time.perf_counter() - started:.0f} s.")
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + " ---: |" * len(header))
    for row in rows:
        cells = [f"{row['threshold']}", f"{row['ratio']:.2f}"] + [f"{row[m]:.2f}" for m in args.methods]
        if "svd" in row:
            lost = row["svd"] - base.wer
            cells += [f"{100 * (row['svd'] - row[m]) / lost:.1f} %" if lost > 0 else "n/a"
                      for m in args.methods if m != "svd"]
        print("| " + " | ".join(cells) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.json").write_text(json.dumps({"original_wer": base.wer, "test": str(test.source),
                                                     "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
