"""Does an ONNX export decode like the model it came from? Parity and WER of the bundled model and of its svd,
psvd and prune outputs, each exported as ``asrshrink export --int8`` does.

    python benchmarks/onnx_wer.py [--test PATH] [--calib PATH] [--out runs/onnx_wer] [--limit N]

Models: the bundled reference model; SVD at threshold 0.2; PSVD at threshold 0.2 (3 iterations on the bundled
calibration sample); magnitude and SparseGPT pruning of the encoder at 50 %. Each is exported (float and
int8 copies; the export itself fails when any part differs from PyTorch by more than 1e-4 on random inputs
and real speech) and the bundled held-out test sample is decoded three times: by PyTorch, by onnxruntime on
the float export, and on the int8 copy. Prints a Markdown table: worst parity difference, WER of each, and
how many utterances the float export decodes to a different hypothesis than PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from asrshrink import api, compress  # noqa: E402
from asrshrink.config import CalibConfig, PruneConfig, SvdConfig  # noqa: E402
from asrshrink.export.check import worst  # noqa: E402
from asrshrink.export.onnx import export_model  # noqa: E402
from asrshrink.export.runtime import load_export  # noqa: E402
from asrshrink.methods.psvd import PsvdConfig  # noqa: E402
from asrshrink.models.checkpoint import ASSETS  # noqa: E402


def build(out: Path, calib: CalibConfig) -> list[tuple[str, str | None]]:
    """(name, model path) of every model to export; None is the bundled model."""
    svd = SvdConfig(threshold=0.2)
    compress.run("svd", model=None, out=out / "svd-0.2", svd=svd)
    compress.run("psvd", model=None, out=out / "psvd-0.2", svd=svd, calib=calib, post=PsvdConfig(iterations=3))
    for method in ("magnitude", "sparsegpt"):
        config = PruneConfig(sparsity=0.5, method=method)
        compress.prune(model=None, out=out / f"{method}-0.5", config=config,
                       calib=calib if config.calibrated else None)
    return [("bundled", None)] + [(name, str(out / name)) for name in
                                  ("svd-0.2", "psvd-0.2", "magnitude-0.5", "sparsegpt-0.5")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test", default=str(ASSETS / "speech" / "test"))
    parser.add_argument("--calib", default=str(ASSETS / "speech" / "calib"))
    parser.add_argument("--limit", type=int, default=None, help="evaluate a seeded subset of N test utterances")
    parser.add_argument("--out", type=Path, default=Path("runs/onnx_wer"))
    args = parser.parse_args()
    started = time.perf_counter()
    rows = []
    for name, path in build(args.out, CalibConfig(path=args.calib)):
        model, info = api.load_model(path)
        test = api.open_dataset(args.test, vocabulary=model.vocabulary, limit=args.limit)
        report = export_model(model, args.out / f"{name}-onnx", info=info, int8=True)
        torch_result = api.evaluate(model, test)
        onnx_result = api.evaluate(load_export(args.out / f"{name}-onnx")[0], test)
        int8_result = api.evaluate(load_export(args.out / f"{name}-onnx" / "encoder.int8.onnx")[0], test)
        differ = sum(a["hypothesis"] != b["hypothesis"]
                     for a, b in zip(torch_result.hypotheses, onnx_result.hypotheses))
        row = {"model": name, "parity": worst(report["parity"]["max_abs_diff"]),
               "int8_diff": worst(report["int8"]["max_abs_diff"]),
               "wer_pytorch": torch_result.wer, "wer_onnx": onnx_result.wer, "wer_int8": int8_result.wer,
               "hypotheses_differ": differ, "utterances": torch_result.num_utterances,
               "mb": sum(size for file, size in report["files"].items() if file.endswith(".onnx")
                         and ".int8." not in file) / 1e6,
               "mb_int8": sum(size for file, size in report["files"].items() if file.endswith(".int8.onnx")) / 1e6}
        rows.append(row)
        print(f"{name}: parity {row['parity'][1]:.2g} ({row['parity'][0]}), WER PyTorch {row['wer_pytorch']:.2f} "
              f"ONNX {row['wer_onnx']:.2f} int8 {row['wer_int8']:.2f}, {differ} hypotheses differ", flush=True)
    print()
    print(f"Test: {args.test} ({rows[0]['utterances']} utterances). Total time {time.perf_counter() - started:.0f} s.")
    print()
    header = ["model", "ONNX MB", "int8 MB", "max abs diff vs PyTorch", "WER PyTorch", "WER ONNX",
              "hypotheses that differ", "WER ONNX int8"]
    print("| " + " | ".join(header) + " |")
    print("| --- |" + " ---: |" * (len(header) - 1))
    for row in rows:
        print(f"| {row['model']} | {row['mb']:.2f} | {row['mb_int8']:.2f} | {row['parity'][1]:.1e} | "
              f"{row['wer_pytorch']:.2f} | {row['wer_onnx']:.2f} | {row['hypotheses_differ']} | "
              f"{row['wer_int8']:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.json").write_text(json.dumps({"test": args.test, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
