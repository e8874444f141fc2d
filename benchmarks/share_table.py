"""The sharing paper's Tables 1-5 on a trained Conformer, after training, at one encoder parameter budget.

Every row is a sharing plan that meets the budget (``--budget`` x the original encoder's parameters), made so
by the largest rank K of the shared feed-forward matrices (``--low-rank`` on ff1 and ff2) that fits (the
paper shrinks its model dimension instead); a row that fits without low rank stays dense. Rows:

- Table 1, repeat: R = 1..4 (adjacent groups of R layers share everything);
- Table 2, modules: repeat ``--base-repeat`` with each module kind unshared in turn;
- Table 3, sub-components: the same base with each sub-component (and misc) unshared in turn;
- Table 4, low rank with and without sharing: repeat 1 (low rank only) against the base repeat, and Basis
  Sharing (every matrix on a basis shared by its group, coefficients and all else per layer);
- init: the base plan with pick, mean and ls;
- handcrafted stand-in: plain and data-aware SVD of every encoder matrix at the same budget (``asrshrink svd``).

Each row: WER after the closed-form construction, encoder parameters (physical), the saved model's MB, the
relative encoder output error on the calibration data, and seconds. With ``--repair-steps N --repair-data
TRAIN`` the rows named by ``--repair-rows`` are then repaired with the same distillation (``share
--finetune-steps``' options: the original model as the teacher, the same steps, schedule, seed and data) and
get a WER after repair: ``best`` is the shared row with the least calibration error (chosen without looking at
the test set), ``svd`` the two handcrafted stand-ins, ``init`` the three initialisations of the base plan.

    python benchmarks/share_table.py --model asrshrink/assets/reference_conformer [--budget 0.4] \\
        [--test PATH] [--test-limit N] [--calib PATH] [--num-utterances 200] [--out runs/share-table] \\
        [--repair-steps 300 --repair-data TRAIN [--repair-rows best,svd]] [--extra-test PATH ...]

``--extra-test PATH`` (repeatable) evaluates the original and every repaired row on more speech, so that the
comparison after repair rests on more words than the bundled sample's.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from asrshrink import api, compress  # noqa: E402
from asrshrink.calibrate import calibration_batches  # noqa: E402
from asrshrink.config import CalibConfig, ShareConfig, SvdConfig  # noqa: E402
from asrshrink.errors import AsrshrinkError  # noqa: E402
from asrshrink.methods.share import (Construction, encoder_error, member_grams, share_model,  # noqa: E402
                                     statistics_keys)
from asrshrink.models.checkpoint import ASSETS  # noqa: E402
from asrshrink.models.sharing import build_plan  # noqa: E402


def encoder_params(model) -> int:
    return sum(p.numel() for p in model.encoder.parameters())


def fit_rank(model, plan, init: str, grams, budget: int, parts, basis: bool = False
             ) -> tuple[object, list, int | None]:
    """The shared model of ``plan`` with the largest rank K of the ``parts`` whose encoder fits ``budget`` (dense
    when it fits as it is; ``basis``: shared bases, per-layer coefficients); raises AsrshrinkError when even
    K = 1 does not fit."""
    if not basis:  # a shared basis is low rank by definition: no dense candidate
        dense, rows = share_model(model, plan, Construction(init), grams)
        if encoder_params(dense) <= budget:
            return dense, rows, None
    lo, hi = 1, model.config.d_model
    count = {}

    def size(k: int) -> int:  # the count does not depend on the values: plain SVD, mean init
        if k not in count:
            count[k] = encoder_params(share_model(model, plan, Construction("mean", low_rank=k, low_rank_parts=parts,
                                                                            shared_basis=basis), None)[0])
        return count[k]

    if size(lo) > budget:
        raise AsrshrinkError(f"does not fit the budget even at rank 1 ({size(lo):,} > {budget:,})")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if size(mid) <= budget else (lo, mid - 1)
    shared, rows = share_model(model, plan, Construction(init, low_rank=lo, low_rank_parts=parts, shared_basis=basis),
                               grams)
    return shared, rows, lo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--budget", type=float, default=0.4, help="encoder parameters kept, as a fraction")
    parser.add_argument("--base-repeat", type=int, default=2)
    parser.add_argument("--test", default=str(ASSETS / "speech" / "test"))
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--calib", default=str(ASSETS / "speech" / "calib"))
    parser.add_argument("--num-utterances", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("runs/share-table"))
    parser.add_argument("--repair-steps", type=int, default=0, help="distillation steps of the repair; 0: none")
    parser.add_argument("--repair-data", default=None, help="the repair's training speech (any --data layout)")
    parser.add_argument("--repair-rows", default="best,svd", help="rows to repair: best, svd, init (comma list)")
    parser.add_argument("--extra-test", action="append", default=[],
                        help="another test set on which the original and every repaired row are evaluated "
                             "(repeatable), for a comparison with more words than the bundled sample's")
    args = parser.parse_args()
    if args.repair_steps and not args.repair_data:
        parser.error("--repair-steps needs --repair-data")
    repair_rows = set(args.repair_rows.split(",")) if args.repair_steps else set()
    if repair_rows - {"best", "svd", "init"}:
        parser.error(f"--repair-rows: unknown {sorted(repair_rows - {'best', 'svd', 'init'})}")
    model, _ = api.load_model(args.model)
    layout = model.sharing_layout()
    parts = tuple(p for p in layout.low_rank_parts if p[0] in ("ff1", "ff2"))
    test = api.open_dataset(args.test, vocabulary=model.vocabulary, limit=args.test_limit, seed=0)
    calib = api.open_dataset(args.calib, vocabulary=model.vocabulary, limit=args.num_utterances, seed=0)
    started = time.perf_counter()
    batches = calibration_batches(model, calib)
    grams = member_grams(model, batches, statistics_keys(model, layout))
    base = api.evaluate(model, test)
    budget = int(args.budget * encoder_params(model))
    print(f"original: WER {base.wer:.2f} % on {base.num_utterances} utterances, {encoder_params(model):,} encoder "
          f"parameters; budget {budget:,} ({args.budget:g}); statistics in {time.perf_counter() - started:.0f} s",
          flush=True)
    rows: list[dict] = []

    def row(table: str, name: str, plan, init: str = "ls", row_parts=None, basis: bool = False) -> None:
        t0 = time.perf_counter()
        try:
            shared, _, rank = fit_rank(model, plan, init, grams, budget, row_parts or parts, basis)
        except AsrshrinkError as exc:
            rows.append({"table": table, "row": name, "status": str(exc)})
            print(f"{table} {name}: {exc}", flush=True)
            return
        seconds = time.perf_counter() - t0
        path = api.save_model(shared, args.out / table / name.replace(" ", "_").replace(",", "+"))
        result = api.evaluate(shared, test)
        rows.append({"table": table, "row": name, "init": init, "rank": rank, "wer": result.wer, "dir": str(path.parent),
                     "encoder_params": encoder_params(shared), "mb": path.stat().st_size / 1e6,
                     "calib_error": encoder_error(model, shared, batches), "seconds": seconds})
        r = rows[-1]
        print(f"{table} {name}: WER {r['wer']:.2f} %, {r['encoder_params']:,} params, rank {rank}, calibration "
              f"error {r['calib_error']:.4f}, {seconds:.1f} s", flush=True)

    n = len(layout.layers)
    for r in range(1, 5):
        if r <= n:
            row("1-repeat", f"repeat {r}", build_plan(layout, repeat=str(r)))
    base_repeat = str(args.base_repeat)
    for kind in layout.modules:
        row("2-modules", f"unshare {kind}", build_plan(layout, repeat=base_repeat,
                                                       modules=tuple(k for k in layout.modules if k != kind)))
    for sub in layout.subcomponents():
        row("3-subcomponents", f"unshare {sub}", build_plan(layout, repeat=base_repeat, unshare=(sub,)))
    row("4-lowrank", "low rank, no sharing", build_plan(layout, repeat="1"))
    row("4-lowrank", f"low rank, repeat {base_repeat}", build_plan(layout, repeat=base_repeat))
    # Basis Sharing: every matrix at one rank on a basis shared by its group, all else per layer
    matrix_free = tuple(f"{k}.{sub}" for k, sub in dict.fromkeys(layout.parts.values())
                        if (k, sub) not in layout.matrices)
    row("4-lowrank", f"shared basis, repeat {base_repeat}, every matrix",
        build_plan(layout, repeat=base_repeat, unshare=("misc",) + matrix_free), row_parts=layout.low_rank_parts,
        basis=True)
    for init in ("pick", "mean", "ls"):
        row("init", f"repeat {base_repeat}, {init}", build_plan(layout, repeat=base_repeat), init)
    for data_aware in (False, True):  # plain SVD is the bar's comparison, data-aware SVD the stronger one
        t0 = time.perf_counter()
        out = args.out / ("svd" if data_aware else "svd-plain")
        report = compress.run_method("svd", SvdConfig(compression_ratio=1 / args.budget, data_aware=data_aware),
                                     model=args.model, out=out,
                                     calib=CalibConfig(path=args.calib, num_utterances=args.num_utterances))
        svd_model = api.load_model(out)[0]
        rows.append({"table": "5-handcrafted", "row": f"{'data-aware' if data_aware else 'plain'} svd, every matrix",
                     "wer": api.evaluate(svd_model, test).wer, "encoder_params": encoder_params(svd_model),
                     "mb": (out / "model.safetensors").stat().st_size / 1e6,
                     "calib_error": encoder_error(model, svd_model, batches), "seconds": time.perf_counter() - t0,
                     "rank": "per matrix", "init": None, "dir": str(out)})
    shared_rows = [r for r in rows if "wer" in r and r["table"] != "5-handcrafted"]
    chosen = []
    if "best" in repair_rows and shared_rows:
        chosen.append(min(shared_rows, key=lambda r: r["calib_error"]))
    if "init" in repair_rows:
        chosen += [r for r in shared_rows if r["table"] == "init"]
    if "svd" in repair_rows:
        chosen += [r for r in rows if r["table"] == "5-handcrafted"]
    repair = ShareConfig(finetune_steps=args.repair_steps, data=args.repair_data).distill_config(args.model)
    for r in {id(r): r for r in chosen}.values():  # each row once
        t0 = time.perf_counter()
        out = Path(r["dir"]) / "repaired"
        compress.run_method("distill", repair, model=r["dir"], out=out, log=lambda line: print(line, flush=True))
        repaired = api.load_model(out)[0]
        r["wer_repaired"] = api.evaluate(repaired, test).wer
        r["calib_error_repaired"] = encoder_error(model, repaired, batches)
        r["repair_seconds"] = time.perf_counter() - t0
        print(f"{r['table']} {r['row']} repaired ({args.repair_steps} steps): WER {r['wer']:.2f} -> "
              f"{r['wer_repaired']:.2f} %, calibration error {r['calib_error_repaired']:.4f}, "
              f"{r['repair_seconds']:.0f} s", flush=True)
    extra = {}
    repaired_models = {id(r): api.load_model(Path(r["dir"]) / "repaired")[0]
                       for r in rows if "wer_repaired" in r} if args.extra_test else {}
    for path in args.extra_test:
        dataset = api.open_dataset(path, vocabulary=model.vocabulary, seed=0)
        extra[path] = {"utterances": len(dataset), "original": api.evaluate(model, dataset).wer}
        for r in rows:
            if "wer_repaired" in r:
                wer = api.evaluate(repaired_models[id(r)], dataset).wer
                r.setdefault("wer_repaired_extra", {})[path] = extra[path][r["row"]] = wer
        print(f"{path} ({extra[path]['utterances']} utterances): " + ", ".join(
            f"{name} {wer:.2f} %" for name, wer in extra[path].items() if name != "utterances"), flush=True)
    print(f"\nOriginal WER {base.wer:.2f} %; encoder budget {budget:,} parameters ({args.budget:g} of "
          f"{encoder_params(model):,}). WER after the closed-form construction"
          + (f"; repair: {args.repair_steps} distillation steps on {args.repair_data}.\n" if args.repair_steps
             else ", no repair.\n"))
    print("| table | row | ff rank | encoder params | MB | calib. error | WER % | WER after repair % | seconds |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "wer" not in r:
            print(f"| {r['table']} | {r['row']} | {r['status']} | | | | | | |")
            continue
        print(f"| {r['table']} | {r['row']} | {r['rank'] or 'dense'} | {r['encoder_params']:,} | {r['mb']:.2f} | "
              f"{r['calib_error']:.4f} | {r['wer']:.2f} | "
              f"{format(r['wer_repaired'], '.2f') if 'wer_repaired' in r else '-'} | {r['seconds']:.1f} |")
    if extra:
        print("\n| test set | utterances | original | " + " | ".join(
            f"{r['row']}, repaired" for r in rows if "wer_repaired" in r) + " |")
        print("| --- | ---: | ---: |" + " ---: |" * sum("wer_repaired" in r for r in rows))
        for path, figures in extra.items():
            print(f"| {path} | {figures['utterances']} | {figures['original']:.2f} | " + " | ".join(
                f"{r['wer_repaired_extra'][path]:.2f}" for r in rows if "wer_repaired" in r) + " |")
    print(f"\nTotal time {time.perf_counter() - started:.0f} s.")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.json").write_text(json.dumps({"original_wer": base.wer, "budget": budget, "rows": rows,
                                                     "extra_tests": extra, "report_svd": report["compression_ratio"]},
                                                    indent=2))


if __name__ == "__main__":
    main()
