"""The AmNet paper's Table 1 on the bundled model: the dense baseline and AmNets (MF and sparse branches; L_avg,
L_avg "biased" (a larger compute weight), and L_avg then L_amr), with WER, encoder parameters, branch ratios,
encoder FLOPs per frame and the modelled delay at one device speed.

    python benchmarks/amnet_table.py --steps 300 --data asrshrink/assets/speech/calib \
        --eval asrshrink/assets/speech/test --out /tmp/amnet-table [--variants mf-avg,mf-amr] [--mu 1.6e8] \
        [--compute-weight 0.1] [--latency-weight 1] [--fast-compression 0.5]

Writes one asrshrink output folder per variant under --out and prints a Markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from asrshrink import compress
from asrshrink.compress import EvalConfig
from asrshrink.config import AmnetConfig

VARIANTS = {
    "mf-avg": dict(branches="mf", loss="avg"),
    "mf-avg-biased": dict(branches="mf", loss="avg", compute_weight=4.0),
    "mf-amr": dict(branches="mf", loss="avg-then-amr"),
    "sparse-avg": dict(branches="sparse", loss="avg"),
    "sparse-avg-biased": dict(branches="sparse", loss="avg", compute_weight=4.0),
    "sparse-amr": dict(branches="sparse", loss="avg-then-amr"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--mu", type=float, default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--compute-weight", type=float, default=None,
                        help="lambda of L_avg for every variant (the biased ones get 4x it); default 1")
    parser.add_argument("--latency-weight", type=float, default=None, help="lambda of L_amr; default 1")
    parser.add_argument("--fast-compression", type=float, default=None, help="the fast branch's compression")
    args = parser.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    rows = []
    for name in args.variants.split(","):
        options = dict(VARIANTS[name])
        if args.compute_weight is not None:
            options["compute_weight"] = args.compute_weight * options.get("compute_weight", 1.0)
        for key in ("latency_weight", "fast_compression"):
            if getattr(args, key) is not None:
                options[key] = getattr(args, key)
        config = AmnetConfig(data=args.data, steps=args.steps, mu=args.mu, **options)
        report = compress.run_method("amnet-finetune", config, model=args.model, out=args.out / name,
                                     evaluation=EvalConfig(path=args.eval, limit=args.eval_limit),
                                     log=lambda line: print(line, flush=True))
        e, fig = report["eval"], report["eval"]["figures"]
        if not rows:
            rows.append(("Baseline", report["before"]["params_by_component"]["encoder"], e["before"]["wer"], "-",
                         fig["dense_flops"], 0.0, fig["dense_latency_ms"]["mean"]))
        f = fig["flops_per_frame"]
        rows.append((name, report["after"]["params_by_component"]["encoder"], e["after"]["wer"],
                     f"{fig['branch_ratios'][0]:.0%} / {fig['branch_ratios'][1]:.0%}", f["mean"],
                     f["relative_to_dense"] - 1, fig["latency_ms"]["mean"]))
    print(f"\nmu = {fig['mu'] / 1e6:.1f} MFLOP/s (2 FLOPs per multiply-add), rho = {fig['rho']:.2f} frames/s\n")
    print("| Model | Encoder params | WER | Branch ratios (S/F) | FLOPs/frame | | Latency (ms) |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for model, params, wer, ratios, flops, rel, latency in rows:
        print(f"| {model} | {params / 1e6:.2f}M | {wer:.2f} | {ratios} | {flops / 1e6:.2f}M | ({rel:+.1%}) | "
              f"{latency:.1f} |")


if __name__ == "__main__":
    main()
