"""Running a compression method end to end: check options, load, calibrate, compress, evaluate, save, report.

One place for what every compressing command shares (``run`` behind svd and psvd, ``prune`` behind prune); the
methods themselves live in ``asrshrink.methods``.
Every option and input is checked before any long work starts, and the output model and reports are written
only once everything has succeeded. PSVD writes a progress checkpoint after every layer into ``OUT/.progress``
(the partially refitted model, with its position in its own metadata, so model and position are one atomic
file), so an interrupted run resumes from the last finished layer.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from asrshrink import api
from asrshrink.calibrate import calibration_batches, check_lstm_walk
from asrshrink.config import CalibConfig, PruneConfig, SvdConfig, from_json, to_json
from asrshrink.errors import AsrshrinkError
from asrshrink.io import write_json_atomic
from asrshrink.methods.prune import MatrixReport, prune_model, prune_targets, walked_components
from asrshrink.methods.psvd import VARIANTS, LayerReport, PsvdConfig, psvd
from asrshrink.methods.svd import (MODES, budget_ranks, choose_ranks, data_aware_svd_compress, input_scales,
                                   svd_compress)
from asrshrink.models.checkpoint import MODEL_FILENAME, bundled_speech, load_model, save_model
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


def check_options(out: Path, svd: SvdConfig, post: PsvdConfig | None) -> None:
    """Refuse bad options before any work is done."""
    svd.check()
    if svd.mode not in MODES:
        raise AsrshrinkError(f"--mode must be one of {', '.join(MODES)}, got {svd.mode!r}")
    if svd.rank is not None and svd.budgeted:
        raise AsrshrinkError("give either --rank or a budget (--compression-ratio / --target-params), not both")
    if svd.compression_ratio is not None and svd.target_params is not None:
        raise AsrshrinkError("give either --compression-ratio or --target-params, not both")
    if svd.compression_ratio is not None and svd.compression_ratio <= 1:
        raise AsrshrinkError(f"--compression-ratio must be above 1, got {svd.compression_ratio}")
    if svd.target_params is not None and svd.target_params <= 0:
        raise AsrshrinkError(f"--target-params must be positive, got {svd.target_params}")
    if post is not None:
        if post.iterations < 1:
            raise AsrshrinkError(f"--iterations must be at least 1, got {post.iterations}")
        if post.refits < 1:
            raise AsrshrinkError(f"--refits must be at least 1, got {post.refits}")
        if post.variant not in VARIANTS:
            raise AsrshrinkError(f"--variant must be one of {', '.join(VARIANTS)}, got {post.variant!r}")
        if not post.components:
            raise AsrshrinkError("psvd refits LSTM layers: --components must include encoder or prediction")
    check_output(out)


def check_output(out: Path) -> None:
    if out.suffix == ".safetensors" or (out.exists() and not out.is_dir()):
        raise AsrshrinkError(f"{out}: -o takes a directory (it receives model.safetensors, report.json and "
                             f"report.md); choose a folder name")


def run(command: str, *, model: str | None, out: Path, svd: SvdConfig, calib: CalibConfig | None = None,
        post: PsvdConfig | None = None, evaluation: EvalConfig | None = None, resume: bool = False,
        log: Log = lambda line: None, progress: Progress | None = None) -> dict:
    """Compress ``model`` with SVD (and PSVD when ``post`` is given) into ``out``; returns the report."""
    started = time.perf_counter()
    out = Path(out)
    check_options(out, svd, post)
    original, info = load_model(model)
    if post is not None or svd.data_aware:
        walked = tuple(dict.fromkeys(svd.components + (post.components if post is not None else ())))
        check_lstm_walk(original, walked, "psvd" if post is not None else "--data-aware svd")
    eval_set = _open_eval(original, evaluation)
    progress_dir = out / PROGRESS
    state = _read_state(progress_dir) if resume else None
    if resume and state is None:
        raise AsrshrinkError(f"{out}: no finished layer to resume from; start the run again without --resume")
    if state is not None and state["source_sha256"] != info.sha256:
        raise AsrshrinkError(f"{out}: the interrupted run compressed another model (sha256 "
                             f"{state['source_sha256'][:12]}…); pass the same MODEL or a new -o")
    batches, calib_used = [], None
    if post is not None or svd.data_aware:
        calib = calib or CalibConfig()
        calib.check()
        batches, calib_used = _calibration(original, calib, log, progress)
    ranks = None
    if svd.budgeted:
        log("measuring per-layer truncation errors for the budget")
        scales = input_scales(original, batches, svd.components) if svd.data_aware else None
        ranks = budget_ranks(original, list(svd.components), mode=svd.mode, scales=scales,
                             compression_ratio=svd.compression_ratio, target_params=svd.target_params)
    choices = choose_ranks(original, list(svd.components), threshold=svd.threshold, rank=svd.rank, mode=svd.mode,
                           ranks=ranks)
    for choice in choices:
        if choice.rank is None:
            log(f"{choice.layer} {choice.side} {choice.rows}x{choice.cols}: {choice.reason}")
    layer_rows: list[dict] = list(state["layers"]) if state else []
    earlier_seconds = state["seconds"] if state else 0.0
    if state is not None:
        compressed, _ = load_model(progress_dir / MODEL_FILENAME)
        start = (state["iteration"], state["block"] + 1)
        log(f"resuming in iteration {state['iteration'] + 1} after block {state['block']}")
    else:
        if post is not None:
            shutil.rmtree(progress_dir, ignore_errors=True)
            write_json_atomic(progress_dir / "options.json", {
                "command": command, "model": str(info.path.resolve()),
                "svd": to_json(svd), "calib": to_json(_absolute(calib)), "psvd": to_json(post),
                "evaluation": to_json(_absolute(evaluation)) if evaluation else None})
        log(("data-aware " if svd.data_aware else "") + f"truncated SVD of {sum(c.rank is not None for c in choices)}"
            " matrices")
        compressed = (data_aware_svd_compress(original, choices, batches) if svd.data_aware
                      else svd_compress(original, choices))
        start = (0, 0)
    if post is not None:
        def on_layer(report: LayerReport, model, iteration: int, block: int) -> None:
            layer_rows.append(report.to_json())
            log(f"iteration {report.iteration} {report.layer} ranks {report.ranks} rows {report.rows}: "
                f"relative output error {report.error_before:.4f} -> {report.error_after:.4f} "
                f"(step {report.step:g}, {report.seconds:.1f} s)")
            save_model(model, progress_dir / MODEL_FILENAME, source_sha256=info.source_sha256, extra={
                "psvd_progress": {"source_sha256": info.sha256, "iteration": iteration, "block": block,
                                  "layers": layer_rows,
                                  "seconds": earlier_seconds + time.perf_counter() - started}})

        psvd(original, compressed, batches, post, on_layer=on_layer, start=start)
    options = {"model": str(info.path), **to_json(svd)}
    if post is not None:
        options.update(psvd=to_json(post))
    if calib_used is not None:
        options.update(calib=to_json(calib), calib_used=calib_used)
    evaluated = _evaluate_both(original, compressed, eval_set, log, progress) if eval_set is not None else None
    path = save_model(compressed, out, source_sha256=info.source_sha256,
                      extra={"method": {"command": command, "options": options}})
    report = build_report(
        command, source={"path": str(info.path), "sha256": info.sha256, "family": original.family},
        output=path, options=options, before=api.describe(original), after=api.describe(compressed),
        layers=[c.to_json() for c in choices], post_training=layer_rows,
        seconds=earlier_seconds + time.perf_counter() - started, evaluation=evaluated)
    write_report(out, report)
    if post is not None:
        shutil.rmtree(progress_dir, ignore_errors=True)
    return report


def prune(*, model: str | None, out: Path, config: PruneConfig, calib: CalibConfig | None = None,
          evaluation: EvalConfig | None = None, log: Log = lambda line: None, progress: Progress | None = None
          ) -> dict:
    """Prune ``model`` per ``config`` into ``out``; returns the report. Calibrated methods read ``calib`` (the
    bundled calibration sample when None)."""
    started = time.perf_counter()
    out = Path(out)
    config.check()
    check_output(out)
    if not config.calibrated and calib is not None and calib.path is not None:
        raise AsrshrinkError("--calib is read only by --method sparsegpt or wanda; drop --calib or choose one")
    original, info = load_model(model)
    targets = prune_targets(original, list(config.components))
    if not any(t.prunable for t in targets):
        raise AsrshrinkError(f"nothing to prune in {', '.join(config.components)} (only low-rank factors); "
                             f"choose other --components")
    if config.calibrated:
        check_lstm_walk(original, config.components, f"--method {config.method}")
    if config.calibrated and not walked_components(original, targets):
        raise AsrshrinkError(f"--method {config.method} prunes LSTM layers on calibration speech: --components "
                             f"must include encoder or prediction")
    eval_set = _open_eval(original, evaluation)
    batches, calib_used = [], None
    if config.calibrated:
        calib = calib or CalibConfig()
        calib.check()
        batches, calib_used = _calibration(original, calib, log, progress)

    def on_matrix(r: MatrixReport) -> None:
        errors = "" if r.error is None else (
            f", relative output error {r.error:.4f} (magnitude {r.error_magnitude:.4f}), layer {r.layer_error:.4f}")
        log(f"{r.layer} {r.side} {r.shape[0]}x{r.shape[1]}: " + (
            f"sparsity {r.sparsity:.3f}{errors} ({r.seconds:.1f} s)" if r.target_sparsity is not None else r.status))

    log(f"{config.method} pruning to sparsity {config.sparsity:g}"
        + (" (one magnitude threshold across all matrices)" if config.global_threshold else " per matrix"))
    pruned, rows = prune_model(original, config, batches, on_matrix=on_matrix)
    options = {"model": str(info.path), **to_json(config)}
    if calib_used is not None:
        options.update(calib=to_json(calib), calib_used=calib_used)
    evaluated = _evaluate_both(original, pruned, eval_set, log, progress) if eval_set is not None else None
    path = save_model(pruned, out, source_sha256=info.source_sha256,
                      extra={"method": {"command": "prune", "options": options}})
    report = build_report(
        "prune", source={"path": str(info.path), "sha256": info.sha256, "family": original.family},
        output=path, options=options, before=api.describe(original), after=api.describe(pruned),
        layers=[r.to_json() for r in rows], seconds=time.perf_counter() - started, evaluation=evaluated)
    write_report(out, report)
    return report


def _open_eval(model, evaluation: EvalConfig | None):
    if evaluation is None or not evaluation.path:
        return None
    return api.open_dataset(evaluation.path, vocabulary=model.vocabulary, sample_rate=model.feature_config.sample_rate,
                            limit=evaluation.limit, seed=evaluation.seed, max_duration=evaluation.max_duration)


def _calibration(model, calib: CalibConfig, log: Log, progress: Progress | None) -> tuple[list[dict], dict]:
    """Featurized calibration batches and a record of what was used."""
    dataset = api.open_dataset(calib.path or bundled_speech("calib", "--calib"), vocabulary=model.vocabulary,
                               sample_rate=model.feature_config.sample_rate,
                               max_duration=calib.max_duration, limit=calib.num_utterances, seed=calib.seed)
    batches = calibration_batches(model, dataset, batch_size=calib.batch_size,
                                  progress=(lambda d, t: progress("featurizing calibration audio", d, t))
                                  if progress else None)
    frames = sum(int(b["feature_lengths"].sum()) for b in batches)
    log(f"calibration: {len(dataset)} utterances from {dataset.source}, {frames} feature frames")
    return batches, {"data": str(dataset.source), "utterances": len(dataset), "feature_frames": frames}


def _absolute(config):
    """The config with its data path made absolute, so a resumed run finds it from any folder."""
    if config is None or config.path is None:
        return config
    return type(config)(**{**config.__dict__, "path": str(Path(config.path).resolve())})


def _read_state(progress_dir: Path) -> dict | None:
    if not (progress_dir / MODEL_FILENAME).is_file():
        return None
    try:
        _, info = load_model(progress_dir / MODEL_FILENAME)
    except AsrshrinkError:
        return None
    return info.extra.get("psvd_progress")


def _evaluate_both(original, compressed, dataset, log: Log, progress: Progress | None) -> dict:
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
    path = Path(out) / PROGRESS / "options.json"
    if not path.is_file():
        raise AsrshrinkError(f"{out}: no interrupted run to resume here (no {PROGRESS}/options.json); "
                             f"start it again without --resume")
    try:
        saved = json.loads(path.read_text())
        return run(saved["command"], model=saved["model"], out=Path(out), svd=from_json(SvdConfig, saved["svd"]),
                   calib=from_json(CalibConfig, saved["calib"]) if saved["calib"] else None,
                   post=from_json(PsvdConfig, saved["psvd"]),
                   evaluation=from_json(EvalConfig, saved["evaluation"]) if saved["evaluation"] else None,
                   resume=True, log=log, progress=progress)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise AsrshrinkError(f"{path}: unreadable ({type(exc).__name__}: {exc}); delete {Path(out) / PROGRESS} "
                             f"and start the run again") from None
