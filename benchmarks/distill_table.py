"""The compression paper's Table 3 comparison on the bundled model at one parameter budget: which of
factorization (F), distillation (D) and sparsity (S), alone or combined, gives the lowest WER.

    python benchmarks/distill_table.py --data PATH [--test PATH] [--steps 300] [--threshold 0.2] \\
        [--lr 5e-4] [--no-spec-augment] [--tables 3,1] [--out runs/distill-table]

Rows, every one fine-tuned for the same ``--steps`` on the same ``--data`` (the teacher is the bundled model).
Table 3 (which of F, D and S at one budget):
  base       a fresh model with the encoder narrowed to about the F row's parameters, ground truth only
  F          svd at ``--threshold`` (no fine-tuning)
  F+GT       F fine-tuned on the ground truth alone (the objective "none" of the paper's Table 1)
  F+D        F distilled: ground truth + lattice KD (TRUTH-KD)
  S+D        the dense model pruned gradually to the F row's encoder size (sparse storage) while distilled
  F+D+S      F on the upper half of the encoder's layers, distilled while the lower half (kept dense) is pruned
             gradually to as many non-zero weights as F gives those layers
Table 1 (the distillation objectives, on the F student; "none" and "truth" are F+GT and F+D):
  F+top-beam         lattice KD on the teacher's top beam hypothesis, plus the transducer loss on it (TOP-KD)
  F+beam             lattice KD on all ``--beam`` hypotheses, weighted by their normalised probabilities (BEAM-KD)
  F+GT+top-beam      TOP-KD from the F+GT row's model ("top beam + student init": a student first trained on
                     the ground truth); with its own ``--steps``, so it has had twice the steps of the others
The two top-beam rows share one teacher cache (the teacher's beam search over --data runs once for them); the
beam row has its own. A row whose folder under ``--out`` already holds a finished model (its report.json) is
reused, not trained again, so an interrupted table continues, and ``--tables 1`` run after ``--tables 3`` in the
same ``--out`` reuses the F, F+GT and F+D rows.
Prints WER, parameters (non-zero), encoder storage and wall time per row. Every run goes through
``asrshrink.compress.run_method`` (the code behind ``asrshrink svd`` and ``asrshrink distill``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from asrshrink import api, compress  # noqa: E402
from asrshrink.config import DistillConfig, SvdConfig  # noqa: E402
from asrshrink.models.checkpoint import ASSETS, DEFAULT_MODEL  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="training speech for the fine-tuning rows")
    parser.add_argument("--test", default=str(ASSETS / "speech" / "test"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threshold", type=float, default=0.2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--no-spec-augment", dest="spec_augment", action="store_false",
                        help="fine-tune on clean features (SpecAugment is on by default, as in distill)")
    parser.add_argument("--tables", default="3,1", help="which tables' rows to run: 3, 1 or 3,1")
    parser.add_argument("--out", type=Path, default=Path("runs/distill-table"))
    args = parser.parse_args()
    teacher = str(DEFAULT_MODEL)
    original, _ = api.load_model(teacher)
    test = api.open_dataset(args.test, vocabulary=original.vocabulary)
    started = time.perf_counter()
    rows: dict[str, dict] = {}

    def finished(name: str) -> dict | None:
        report = args.out / name / "report.json"
        if not report.is_file():
            return None
        done = json.loads(report.read_text())
        options = done.get("options", {})
        wanted = {"steps": args.steps, "lr": args.lr, "spec_augment": args.spec_augment, "data": args.data}
        stale = {k: options.get(k) for k, v in wanted.items() if options.get(k) != v} if "steps" in options else {}
        if stale:  # a fine-tuned row (svd rows have no training options)
            raise SystemExit(f"{report}: this row was made with {stale}, not this run's options; remove "
                             f"{report.parent} or give another --out")
        print(f"{name}: reusing the finished row in {report.parent}", flush=True)
        return done

    def record(name: str, report: dict) -> None:
        model, _ = api.load_model(args.out / name)
        result = api.evaluate(model, test)
        after = report["after"]
        rows[name] = {"wer": result.wer, "params": after["params"], "nonzero": after["nonzero_params"],
                      "encoder_mb": after["sparse_bytes_by_component"]["encoder"] / 1e6,
                      "seconds": report["seconds"]}
        print(f"{name}: WER {result.wer:.2f} %, {after['nonzero_params']:,} non-zero parameters, "
              f"{report['seconds']:.0f} s", flush=True)

    def distill(name: str, model: str, **changes) -> None:
        report = finished(name)
        if report is None:
            config = DistillConfig(data=args.data, steps=args.steps, lr=args.lr, spec_augment=args.spec_augment,
                                   **changes)
            report = compress.run_method("distill", config, model=model, out=args.out / name)
        record(name, report)

    base = api.evaluate(original, test)
    print(f"original: WER {base.wer:.2f} % on {base.num_utterances} utterances", flush=True)
    record("F", finished("F") or compress.run_method("svd", SvdConfig(threshold=args.threshold), model=teacher,
                                                     out=args.out / "F"))
    f_model = str(args.out / "F")
    budget = rows["F"]["encoder_mb"] / (sum(p.numel() for p in original.encoder.parameters()) * 4 / 1e6)
    width = max(16, int(original.config.encoder_hidden * budget ** 0.5))
    tables = {t.strip() for t in args.tables.split(",")}
    if "3" in tables:
        distill("base", teacher, student_config=json.dumps({"encoder_hidden": width}), kd_weight=0.0)
    distill("F+GT", f_model, teacher=teacher, kd_weight=0.0)
    distill("F+D", f_model, teacher=teacher)
    if "3" in tables:
        distill("S+D", teacher, teacher=teacher, prune_to=round(1 - budget, 3))
        # Every matrix of F is low rank, so nothing of it is left to prune: F+D+S factorises the upper half of
        # the encoder's layers as F does and prunes the lower half gradually to the sparsity at which they have
        # as many non-zero weights as F gives them.
        layers = list(dict.fromkeys(t.layer for t in original.weight_targets(["encoder"])))
        lower = layers[:len(layers) // 2]
        upper = args.out / "F-upper"
        if not (args.out / "F+D+S" / "report.json").is_file() and not (upper / "report.json").is_file():
            compress.run_method("svd", SvdConfig(threshold=args.threshold, ignore=tuple(lower)), model=teacher,
                                out=upper)
        factored, _ = api.load_model(f_model)
        sparsity = 1 - _weights(factored, lower) / _weights(original, lower)
        distill("F+D+S", str(upper), teacher=teacher, prune_to=round(sparsity, 3))
    if "1" in tables:
        beams = dict(beam=args.beam, teacher_cache=str(args.out / "cache-top-beam"))
        distill("F+top-beam", f_model, teacher=teacher, objective="top-beam", pseudo_weight=1.0, **beams)
        distill("F+beam", f_model, teacher=teacher, objective="beam", beam=args.beam,
                teacher_cache=str(args.out / "cache-beam"))
        distill("F+GT+top-beam", str(args.out / "F+GT"), teacher=teacher, objective="top-beam", pseudo_weight=1.0,
                **beams)
    print(f"\nOriginal WER {base.wer:.2f} % on {test.source}; {args.steps} steps per fine-tuned row; total "
          f"{time.perf_counter() - started:.0f} s.\n")
    print("| row | WER % | non-zero params | encoder MB (sparse storage) | s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, row in rows.items():
        print(f"| {name} | {row['wer']:.2f} | {row['nonzero']:,} | {row['encoder_mb']:.2f} | {row['seconds']:.0f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.json").write_text(json.dumps({"original_wer": base.wer, "rows": rows}, indent=2))


def _weights(model, layers: list[str]) -> int:
    """Weight-matrix parameters (biases left out) of ``layers``, dense or factorised."""
    return sum(p.numel() for layer in layers for name, p in model.get_submodule(layer).named_parameters()
               if not name.endswith("bias") and p.dim() > 1)


if __name__ == "__main__":
    main()
