"""Running a compression method end to end: load, calibrate, compress, save, evaluate, report.

One place for what every compressing command shares; the methods themselves live in ``asrshrink.methods``.
PSVD writes a progress checkpoint (the partially refitted model and its position) after every layer into
``OUT/.progress``, so an interrupted run resumes from the last finished layer.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from asrshrink import api
from asrshrink.calibrate import calibration_batches
from asrshrink.config import CalibConfig, SvdConfig, from_json, to_json
from asrshrink.errors import AsrshrinkError
from asrshrink.io import write_json_atomic
from asrshrink.methods.psvd import LayerReport, PsvdConfig, psvd
from asrshrink.methods.svd import (budget_ranks, choose_ranks, data_aware_svd_compress, input_scales,
                                   svd_compress)
from asrshrink.models.checkpoint import MODEL_FILENAME, ASSETS, load_model, save_model
from asrshrink.report import build_report, write_report

PROGRESS = ".progress"
Log = Callable[[str], None]
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class EvalConfig:
    path: str | None = None
    limit: int | None = None
    seed: int = 0
    max_duration: float | None = None


def default_calibration() -> Path:
    path = ASSETS / "speech" / "calib"
    if not path.is_dir():
        raise AsrshrinkError("no --calib given and this installation has no bundled calibration sample; "
                             "pass --calib PATH (a LibriSpeech folder, audio + .txt folder or a manifest)")
    return path


def run(command: str, *, model: str | None, out: Path, svd: SvdConfig, calib: CalibConfig | None = None,
        post: PsvdConfig | None = None, evaluation: EvalConfig | None = None, resume: bool = False,
        log: Log = lambda line: None, progress: Progress | None = None) -> dict:
    """Compress ``model`` with SVD (and PSVD when ``post`` is given) into ``out``; returns the report."""
    started = time.perf_counter()
    svd.check()
    original, info = load_model(model)
    progress_dir = out / PROGRESS
    state = _read_state(progress_dir) if resume else None
    if state is not None and state["source_sha256"] != info.sha256:
        raise AsrshrinkError(f"{out}: the interrupted run compressed another model (sha256 "
                             f"{state['source_sha256'][:12]}…); pass the same MODEL or a new -o")
    batches = []
    if post is not None or svd.data_aware:
        calib = calib or CalibConfig()
        dataset = api.open_dataset(calib.path or default_calibration(), vocabulary=original.vocabulary,
                                   sample_rate=original.feature_config.sample_rate,
                                   max_duration=calib.max_duration, limit=calib.num_utterances, seed=calib.seed)
        batches = calibration_batches(original, dataset, batch_size=calib.batch_size,
                                      progress=(lambda d, t: progress("featurizing calibration audio", d, t))
                                      if progress else None)
        frames = sum(int(b["feature_lengths"].sum()) for b in batches)
        log(f"calibration: {len(dataset)} utterances from {dataset.source}, {frames} feature frames")
    ranks = None
    if svd.budgeted:
        scales = input_scales(original, batches, svd.components) if svd.data_aware else None
        ranks = budget_ranks(original, list(svd.components), mode=svd.mode, scales=scales,
                             compression_ratio=svd.compression_ratio, target_params=svd.target_params)
    choices = choose_ranks(original, list(svd.components), threshold=svd.threshold, rank=svd.rank, mode=svd.mode,
                           ranks=ranks)
    for choice in choices:
        if choice.rank is None:
            log(f"{choice.layer} {choice.side} {choice.rows}x{choice.cols}: {choice.reason}")
    layer_rows: list[dict] = list(state["layers"]) if state else []
    if state is not None:
        compressed, _ = load_model(progress_dir / MODEL_FILENAME)
        start = (state["iteration"], state["block"] + 1)
        log(f"resuming after iteration {state['iteration'] + 1}, block {state['block']}")
    else:
        shutil.rmtree(progress_dir, ignore_errors=True)
        if post is not None:
            write_json_atomic(progress_dir / "options.json", {
                "command": command, "model": str(info.path), "svd": to_json(svd),
                "calib": to_json(calib) if calib else None, "psvd": to_json(post),
                "evaluation": to_json(evaluation) if evaluation else None})
        compressed = (data_aware_svd_compress(original, choices, batches) if svd.data_aware
                      else svd_compress(original, choices))
        start = (0, 0)
    if post is not None:
        def on_layer(report: LayerReport, model, iteration: int, block: int) -> None:
            layer_rows.append(report.to_json())
            errors = ", ".join(f"{k} {report.error_before[k]:.4f} -> {report.error_after[k]:.4f}"
                               for k in report.error_before)
            log(f"iteration {report.iteration} {report.layer} rank {report.ranks} rows {report.rows}: "
                f"relative error {errors} ({report.seconds:.1f} s)")
            save_model(model, progress_dir / MODEL_FILENAME, source_sha256=info.source_sha256)
            write_json_atomic(progress_dir / "state.json", {
                "source_sha256": info.sha256, "iteration": iteration, "block": block, "layers": layer_rows})

        psvd(original, compressed, batches, post, on_layer=on_layer, start=start)
    options = {"model": str(info.path), **to_json(svd)}
    if post is not None:
        options.update(psvd=to_json(post))
    if calib is not None and batches:
        options.update(calib=to_json(calib))
    method = {"command": command, "options": options}
    path = save_model(compressed, out, source_sha256=info.source_sha256, extra={"method": method})
    evaluated = None
    if evaluation is not None and evaluation.path:
        evaluated = _evaluate_both(original, compressed, evaluation, log, progress)
    report = build_report(
        command, source={"path": str(info.path), "sha256": info.sha256, "family": original.family},
        output=path, options=options, before=api.describe(original), after=api.describe(compressed),
        layers=[c.to_json() for c in choices], post_training=layer_rows, seconds=time.perf_counter() - started,
        evaluation=evaluated)
    write_report(out, report)
    shutil.rmtree(progress_dir, ignore_errors=True)
    return report


def _read_state(progress_dir: Path) -> dict | None:
    path = progress_dir / "state.json"
    if not path.is_file() or not (progress_dir / MODEL_FILENAME).is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _evaluate_both(original, compressed, evaluation: EvalConfig, log: Log, progress: Progress | None) -> dict:
    dataset = api.open_dataset(evaluation.path, vocabulary=original.vocabulary,
                               sample_rate=original.feature_config.sample_rate, limit=evaluation.limit,
                               seed=evaluation.seed, max_duration=evaluation.max_duration)
    results = {}
    for name, model in (("before", original), ("after", compressed)):
        result = api.evaluate(model, dataset, progress=(lambda d, t, n=name: progress(f"evaluating ({n})", d, t))
                              if progress else None)
        results[name] = {"wer": result.wer, "cer": result.cer}
        log(f"WER {name}: {result.wer:.2f} % (CER {result.cer:.2f} %)")
    return {"data": str(dataset.source), "num_utterances": result.num_utterances, "num_words": result.num_words,
            **results}


def resume(out: Path, *, log: Log = lambda line: None, progress: Progress | None = None) -> dict:
    """Continue the interrupted PSVD run in ``out`` with the options it was started with."""
    path = out / PROGRESS / "options.json"
    if not path.is_file():
        raise AsrshrinkError(f"{out}: no interrupted run to resume here (no {PROGRESS}/options.json); "
                             f"start it again without --resume")
    saved = json.loads(path.read_text())
    return run(saved["command"], model=saved["model"], out=out, svd=from_json(SvdConfig, saved["svd"]),
               calib=from_json(CalibConfig, saved["calib"]) if saved["calib"] else None,
               post=from_json(PsvdConfig, saved["psvd"]),
               evaluation=from_json(EvalConfig, saved["evaluation"]) if saved["evaluation"] else None,
               resume=True, log=log, progress=progress)
