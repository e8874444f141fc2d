"""Running a compression method end to end: check options, load, calibrate, compress, evaluate, save, report.

One place for what every compressing command shares (``run`` behind svd and psvd, ``prune`` behind prune); the
methods themselves live in ``asrshrink.methods``.
Every option and input (model, calibration and evaluation data, the writability of ``OUT``) is checked
before any long work starts. ``OUT`` belongs to one run (``asrshrink.output.OutputFolder``: an OS lock held for
the run); the model and reports are staged beside it and published together once everything has succeeded,
so a failed run leaves ``OUT`` as it was. PSVD writes a progress checkpoint after every layer into
``OUT/.progress`` (the partially refitted model, with its position and the run's full options in its own
metadata, so model, position and options are one atomic file), so an interrupted run resumes from the last
finished layer; ``resume`` refuses a checkpoint whose options or source model do not match.
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
from asrshrink.output import OutputFolder
from asrshrink.report import build_report, write_report

PROGRESS = ".progress"
#: What a compressing command writes into OUT (an existing OUT holding anything else is refused).
OWNED = (MODEL_FILENAME, "report.json", "report.md", PROGRESS)
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


def _refuse_interrupted(out: Path, command: str) -> None:
    """A fresh run must not silently discard (or mix with) another run's resumable progress in ``out``; a
    progress folder without a finished layer (a run stopped before its first layer) is dropped."""
    if (out / PROGRESS / MODEL_FILENAME).exists():
        raise AsrshrinkError(f"{out}: holds an interrupted psvd run ({out / PROGRESS}); continue it with "
                             f"asrshrink psvd --resume {out}, or remove {out / PROGRESS} (or choose another -o) "
                             f"to start this {command} run")
    shutil.rmtree(out / PROGRESS, ignore_errors=True)


def run(command: str, *, model: str | None, out: Path, svd: SvdConfig, calib: CalibConfig | None = None,
        post: PsvdConfig | None = None, evaluation: EvalConfig | None = None, resume: bool = False,
        log: Log = lambda line: None, progress: Progress | None = None) -> dict:
    """Compress ``model`` with SVD (and PSVD when ``post`` is given) into ``out``; returns the report."""
    out = Path(out)
    check_options(out, svd, post)
    if post is None and resume:
        raise AsrshrinkError("only psvd runs can be resumed")
    with OutputFolder(out, owned=OWNED) as folder:
        if not resume:
            _refuse_interrupted(out, command)
        try:
            return _run(command, folder, model=model, svd=svd, calib=calib, post=post, evaluation=evaluation,
                        resume=resume, log=log, progress=progress)
        except KeyboardInterrupt:  # the progress checkpoint stays (resume with --resume OUT) if it has a layer
            if not (out / PROGRESS / MODEL_FILENAME).is_file():
                shutil.rmtree(out / PROGRESS, ignore_errors=True)
            raise
        except BaseException:
            if post is not None and not resume:
                shutil.rmtree(out / PROGRESS, ignore_errors=True)  # this run's own, useless after an error
            raise


def run_options(command: str, info, svd: SvdConfig, calib: CalibConfig | None, post: PsvdConfig | None,
                evaluation: EvalConfig | None) -> dict:
    """The full record of a run's options, as saved for ``resume`` (paths absolute)."""
    return {"command": command, "model": str(info.path.resolve()), "source_sha256": info.sha256,
            "svd": to_json(svd), "calib": to_json(_absolute(calib)) if calib else None,
            "psvd": to_json(post) if post else None,
            "evaluation": to_json(_absolute(evaluation)) if evaluation else None}


def _run(command: str, folder: OutputFolder, *, model: str | None, svd: SvdConfig, calib: CalibConfig | None,
         post: PsvdConfig | None, evaluation: EvalConfig | None, resume: bool, log: Log,
         progress: Progress | None) -> dict:
    started = time.perf_counter()
    out = folder.out
    original, info = load_model(model)
    if post is not None or svd.data_aware:
        walked = tuple(dict.fromkeys(svd.components + (post.components if post is not None else ())))
        check_lstm_walk(original, walked, "psvd" if post is not None else "--data-aware svd")
    eval_set = _open_eval(original, evaluation)
    progress_dir = out / PROGRESS
    if post is not None or svd.data_aware:
        calib = calib or CalibConfig()
        calib.check()
    record = run_options(command, info, svd, calib, post, evaluation)
    state = _read_state(progress_dir) if resume else None
    if resume and state is None:
        raise AsrshrinkError(f"{out}: no finished layer to resume from; start the run again without --resume")
    if state is not None and state.get("source_sha256") != info.sha256:
        raise AsrshrinkError(f"{out}: the interrupted run compressed another model (sha256 "
                             f"{str(state.get('source_sha256'))[:12]}…); pass the same MODEL or a new -o")
    if state is not None and state.get("options") != record:
        raise AsrshrinkError(f"{progress_dir}: its checkpoint was written with other options than "
                             f"{PROGRESS}/options.json ({_difference(state.get('options'), record)}); remove "
                             f"{progress_dir} and start the run again")
    batches, calib_used = [], None
    if post is not None or svd.data_aware:
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
            write_json_atomic(progress_dir / "options.json", record)
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
                "psvd_progress": {"source_sha256": info.sha256, "options": record, "iteration": iteration,
                                  "block": block, "layers": layer_rows,
                                  "seconds": earlier_seconds + time.perf_counter() - started}})

        psvd(original, compressed, batches, post, on_layer=on_layer, start=start)
    options = {"model": str(info.path.resolve()), **to_json(svd)}
    if post is not None:
        options.update(psvd=to_json(post))
    if calib_used is not None:
        options.update(calib=to_json(_absolute(calib)), calib_used=calib_used)
    evaluated = _evaluate_both(original, compressed, eval_set, log, progress) if eval_set is not None else None
    return _publish(folder, command, compressed, info, original, options=options,
                    layers=[c.to_json() for c in choices], post_training=layer_rows,
                    seconds=earlier_seconds + time.perf_counter() - started, evaluated=evaluated)


def _publish(folder: OutputFolder, command: str, compressed, info, original, *, options: dict, layers: list,
             seconds: float, evaluated: dict | None, post_training: list | None = None) -> dict:
    """Stage model.safetensors, report.json and report.md, then publish them together into ``folder.out``
    (which drops any progress checkpoint there)."""
    staged = save_model(compressed, folder.staging, source_sha256=info.source_sha256,
                        extra={"method": {"command": command, "options": options}})
    report = build_report(
        command, source={"path": str(info.path), "sha256": info.sha256, "family": original.family},
        output=staged, options=options, before=api.describe(original), after=api.describe(compressed),
        layers=layers, post_training=post_training, seconds=seconds, evaluation=evaluated)
    report["output"]["path"] = str(folder.out / MODEL_FILENAME)
    write_report(folder.staging, report)
    folder.publish()
    return report


def prune(*, model: str | None, out: Path, config: PruneConfig, calib: CalibConfig | None = None,
          evaluation: EvalConfig | None = None, log: Log = lambda line: None, progress: Progress | None = None
          ) -> dict:
    """Prune ``model`` per ``config`` into ``out``; returns the report. Calibrated methods read ``calib`` (the
    bundled calibration sample when None)."""
    out = Path(out)
    config.check()
    check_output(out)
    if not config.calibrated and calib is not None and calib.path is not None:
        raise AsrshrinkError("--calib is read only by --method sparsegpt or wanda; drop --calib or choose one")
    with OutputFolder(out, owned=OWNED) as folder:
        _refuse_interrupted(out, "prune")
        return _prune(folder, model=model, config=config, calib=calib, evaluation=evaluation, log=log,
                      progress=progress)


def _prune(folder: OutputFolder, *, model: str | None, config: PruneConfig, calib: CalibConfig | None,
           evaluation: EvalConfig | None, log: Log, progress: Progress | None) -> dict:
    started = time.perf_counter()
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
    options = {"model": str(info.path.resolve()), **to_json(config)}
    if calib_used is not None:
        options.update(calib=to_json(_absolute(calib)), calib_used=calib_used)
    evaluated = _evaluate_both(original, pruned, eval_set, log, progress) if eval_set is not None else None
    return _publish(folder, "prune", pruned, info, original, options=options, layers=[r.to_json() for r in rows],
                    seconds=time.perf_counter() - started, evaluated=evaluated)


def _open_eval(model, evaluation: EvalConfig | None):
    """The --eval dataset, with every file's header read now (missing, unreadable or too-short audio is
    reported before the compute, not after it)."""
    if evaluation is None or not evaluation.path:
        return None
    if evaluation.limit is not None and evaluation.limit < 1:
        raise AsrshrinkError(f"--eval-limit must be at least 1, got {evaluation.limit}")
    dataset = api.open_dataset(evaluation.path, vocabulary=model.vocabulary,
                               sample_rate=model.feature_config.sample_rate, limit=evaluation.limit,
                               seed=evaluation.seed, max_duration=evaluation.max_duration)
    check_audio(model, dataset, "--eval")
    return dataset


def check_audio(model, dataset, option: str) -> None:
    """Read every entry's audio header: refuse missing, unreadable and too-short files, naming the file."""
    from asrshrink.audio.datasets import _audio_info_duration

    shortest = model.feature_config.min_samples / model.feature_config.sample_rate
    for entry in dataset.entries:
        seconds = _audio_info_duration(entry.audio_path)
        if seconds < shortest:
            raise AsrshrinkError(f"{entry.audio_path}: {seconds:.4f} s of audio, shorter than the {shortest:.4f} s "
                                 f"the featurizer needs; remove it from the {option} data")


def _calibration(model, calib: CalibConfig, log: Log, progress: Progress | None) -> tuple[list[dict], dict]:
    """Featurized calibration batches and a record of what was used."""
    from asrshrink.errors import DataError

    try:
        dataset = api.open_dataset(calib.path or bundled_speech("calib", "--calib"), vocabulary=model.vocabulary,
                                   sample_rate=model.feature_config.sample_rate,
                                   max_duration=calib.max_duration, limit=calib.num_utterances, seed=calib.seed)
    except DataError as exc:
        if "longer than the maximum duration" not in str(exc):
            raise
        raise DataError(f"{calib.path}: every --calib utterance is longer than {calib.max_duration:g} s, the "
                        f"longest a calibration utterance may be; pass --calib data with shorter "
                        f"utterances") from None
    check_audio(model, dataset, "--calib")
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


def _difference(saved, current) -> str:
    """The first option where two option records differ, as "section.field saved X, now Y"."""
    saved, current = saved or {}, current or {}
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            for field in sorted(set(a) | set(b)):
                if a.get(field) != b.get(field):
                    return f"{key}.{field}: {a.get(field)!r} there, {b.get(field)!r} here"
        elif a != b:
            return f"{key}: {a!r} there, {b!r} here"
    return "no difference"


def _normalise(value):
    if isinstance(value, tuple):
        return list(value)
    return value


def resume(out: Path, *, given: dict[str, tuple[str, str, object]] | None = None, model: str | None = None,
           log: Log = lambda line: None, progress: Progress | None = None) -> dict:
    """Continue the interrupted PSVD run in ``out`` with the options it was started with.

    ``given`` maps each option the user passed explicitly (e.g. "--rank-threshold") to (section, field, value)
    of the saved record (sections: svd, calib, psvd, evaluation); one that contradicts the saved value is
    refused, naming both. ``model``, when given, must be the interrupted run's source model (same sha256)."""
    out = Path(out)
    path = out / PROGRESS / "options.json"
    if not path.is_file():
        raise AsrshrinkError(f"{out}: no interrupted run to resume here (no {PROGRESS}/options.json); "
                             f"start it again without --resume")
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise TypeError("not an object")
        for option, (section, field, value) in (given or {}).items():
            record = saved.get(section) or {}
            if _normalise(value) != record.get(field):
                raise AsrshrinkError(f"{option} {_show(value)} contradicts the interrupted run in {out}, which used "
                                     f"{_show(record.get(field))} ({path}); drop {option} to resume it, or start "
                                     f"a new run with another -o")
        if model is not None:
            from asrshrink.models.checkpoint import _file_format, resolve_model_path
            from asrshrink.io import sha256_file

            given_path = resolve_model_path(model)
            _file_format(given_path)
            if sha256_file(given_path) != saved.get("source_sha256"):
                raise AsrshrinkError(f"{given_path}: not the model the interrupted run in {out} compressed "
                                     f"({saved.get('model')}); drop MODEL to resume it, or start a new run with "
                                     f"another -o")
        return run(saved["command"], model=saved["model"], out=out, svd=from_json(SvdConfig, saved["svd"]),
                   calib=from_json(CalibConfig, saved["calib"]) if saved["calib"] else None,
                   post=from_json(PsvdConfig, saved["psvd"]),
                   evaluation=from_json(EvalConfig, saved["evaluation"]) if saved["evaluation"] else None,
                   resume=True, log=log, progress=progress)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise AsrshrinkError(f"{path}: unreadable ({type(exc).__name__}: {exc}); delete {out / PROGRESS} "
                             f"and start the run again") from None


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return "(none)" if value is None else str(value)
