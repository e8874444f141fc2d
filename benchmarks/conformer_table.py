"""Every method on a Conformer transducer, in two tables.

Low rank: the encoder's feed-forward and attention matrices factorised under one budget (the encoder as a
whole ``--ratio`` times smaller, per-matrix ranks where the measured error drops most per parameter), by SVD,
data-aware SVD, PSVD (``--iterations``) and data-aware PSVD; WER_rel = (WER_svd - WER_method) / (WER_svd -
WER_orig), the share of the WER lost to SVD that the method wins back.
Sparsity: every encoder Linear at ``--sparsity`` by magnitude, Wanda and SparseGPT, and each at 2:4.

    python benchmarks/conformer_table.py --model asrshrink/assets/reference_conformer \\
        [--test PATH] [--calib PATH] [--ratio 2.0] [--sparsity 0.5] [--out runs/conformer-table]

Defaults: the bundled test and calibration samples. Every run goes through ``asrshrink.compress.run_method``,
the code behind ``asrshrink svd`` / ``psvd`` / ``prune``; each writes its model and report under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from asrshrink import api, compress  # noqa: E402
from asrshrink.config import CalibConfig, PruneConfig, PsvdConfig, PsvdRunConfig, SvdConfig  # noqa: E402
from asrshrink.models.checkpoint import ASSETS  # noqa: E402

FF_ATT = ("encoder.layers.*.feed_forward*", "encoder.layers.*.self_attn.*")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--test", default=str(ASSETS / "speech" / "test"))
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--calib", default=str(ASSETS / "speech" / "calib"))
    parser.add_argument("--num-utterances", type=int, default=200)
    parser.add_argument("--ratio", type=float, default=2.0)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--parts", nargs="+", default=["lowrank", "sparse"], choices=["lowrank", "sparse"])
    parser.add_argument("--out", type=Path, default=Path("runs/conformer-table"))
    args = parser.parse_args()
    model, _ = api.load_model(args.model)
    test = api.open_dataset(args.test, vocabulary=model.vocabulary, limit=args.test_limit, seed=0)
    calib = CalibConfig(path=args.calib, num_utterances=args.num_utterances)
    started = time.perf_counter()
    base = api.evaluate(model, test)
    print(f"original: WER {base.wer:.2f} % on {base.num_utterances} utterances ({base.num_words} words), "
          f"{sum(p.numel() for p in model.encoder.parameters()):,} encoder parameters", flush=True)
    results = {"original_wer": base.wer, "test": str(test.source), "utterances": base.num_utterances}

    def run(name: str, method: str, config) -> dict:
        out = args.out / name
        report = compress.run_method(method, config, model=args.model, out=out,
                                     calib=calib if method != "prune" or config.calibrated else None)
        result = api.evaluate(api.load_model(out)[0], test)
        row = {"wer": result.wer, "encoder_ratio": report["compression_ratio"]["by_component"]["encoder"],
               "storage_ratio": report["compression_ratio"].get("storage", {}).get("by_component", {}).get("encoder"),
               "seconds": report["seconds"]}
        print(f"{name}: WER {result.wer:.2f} % (encoder {row['encoder_ratio']:.2f}x, {report['seconds']:.0f} s)",
              flush=True)
        return row

    if "lowrank" in args.parts:
        lowrank = {}
        for name, data_aware, post in (("svd", False, False), ("da-svd", True, False), ("psvd", False, True),
                                       ("da-psvd", True, True)):
            svd = SvdConfig(compression_ratio=args.ratio, data_aware=data_aware, targets=FF_ATT)
            config = PsvdRunConfig(svd, PsvdConfig(iterations=args.iterations)) if post else svd
            lowrank[name] = run(name, "psvd" if post else "svd", config)
        results["lowrank"] = lowrank
        lost = lowrank["svd"]["wer"] - base.wer
        print(f"\nLow rank: encoder feed-forward and attention under one budget, encoder {args.ratio:g}x smaller. "
              f"Original WER {base.wer:.2f} %.\n")
        print("| method | encoder CR | WER % | WER_rel |")
        print("| --- | ---: | ---: | ---: |")
        for name, row in lowrank.items():
            rel = "-" if name == "svd" else (f"{100 * (lowrank['svd']['wer'] - row['wer']) / lost:.1f} %"
                                            if lost > 0 else "n/a")
            print(f"| {name} | {row['encoder_ratio']:.2f} | {row['wer']:.2f} | {rel} |")
    if "sparse" in args.parts:
        sparse = {}
        for method in ("magnitude", "wanda", "sparsegpt"):
            for pattern in (None, "2:4"):
                name = f"{method}-{pattern or args.sparsity}"
                sparse[name] = run(name.replace(":", "of"), "prune", PruneConfig(
                    sparsity=0.5 if pattern else args.sparsity, method=method, pattern=pattern))
        results["sparse"] = sparse
        print(f"\nSparsity: every encoder Linear. Original WER {base.wer:.2f} %.\n")
        print("| method | pattern | encoder storage ratio | WER % | WER / dense WER |")
        print("| --- | --- | ---: | ---: | ---: |")
        for name, row in sparse.items():
            method, pattern = name.split("-", 1)
            print(f"| {method} | {pattern if ':' in pattern else 'unstructured ' + pattern} | "
                  f"{row['storage_ratio']:.2f} | {row['wer']:.2f} | {row['wer'] / max(base.wer, 1e-9):.2f} |")
    print(f"\nTotal time {time.perf_counter() - started:.0f} s.")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
