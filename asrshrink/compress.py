"""Running a compression method end to end: check options, load, calibrate, compress, evaluate, save, report.

One place for what every compressing command shares: ``run_method(name, config, ...)`` runs any method of the
registry (``asrshrink.methods.registry``); the methods themselves live in ``asrshrink.methods``.
Every option and input (model, calibration and evaluation data, the writability of ``OUT``) is checked
before any long work starts. ``OUT`` belongs to one run (``asrshrink.output.OutputFolder``: an OS lock held for
the run); the model and reports are staged beside it and published together once everything has succeeded,
so a failed run leaves ``OUT`` as it was. PSVD writes a progress checkpoint after every layer into
``OUT/.progress`` (the partially refitted model, with its position and the run's full options in its own
metadata, so model, position and options are one atomic file), so an interrupted run resumes from the last
finished layer; ``resume`` refuses a checkpoint whose options or source model do not match.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Callable

import torch

from asrshrink.audio.datasets import open_dataset
from asrshrink.calibrate import calibration_batches
from asrshrink.calibrate.stats import all_reduce, distributed
from asrshrink.config import CalibConfig, PruneConfig, PsvdConfig, PsvdRunConfig, SvdConfig, from_json, to_json
from asrshrink.errors import AsrshrinkError
from asrshrink.evaluate.corpus import evaluate
from asrshrink.io import write_json_atomic
from asrshrink.methods.registry import Context, get_method
from asrshrink.models.checkpoint import MODEL_FILENAME, bundled_speech, load_model, save_model
from asrshrink.models.describe import describe
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


def check_output(out: Path) -> None:
    if out.suffix == ".safetensors" or (out.exists() and not out.is_dir()):
        raise AsrshrinkError(f"{out}: -o takes a directory (it receives model.safetensors, report.json and "
                             f"report.md); choose a folder name")


def interrupted_run(out: Path) -> str | None:
    """The method of the interrupted, resumable run in ``out`` (its progress folder holds the run's options
    and a checkpoint), or None."""
    try:
        name = json.loads((Path(out) / PROGRESS / "options.json").read_text()).get("command")
        method = get_method(name)
    except (OSError, ValueError, AttributeError, AsrshrinkError):
        return None
    return name if (Path(out) / PROGRESS / method.checkpoint_file).is_file() else None


def _refuse_interrupted(out: Path, command: str) -> None:
    """A fresh run must not silently discard (or mix with) another run's resumable progress in ``out``; a
    progress folder without a checkpoint (a run stopped before its first one) is dropped."""
    name = interrupted_run(out) or ("psvd" if (out / PROGRESS / MODEL_FILENAME).exists() else None)
    if name:
        raise AsrshrinkError(f"{out}: holds an interrupted {name} run ({out / PROGRESS}); continue it with "
                             f"asrshrink {name} --resume {out}, or remove {out / PROGRESS} (or choose another -o) "
                             f"to start this {command} run")
    shutil.rmtree(out / PROGRESS, ignore_errors=True)


def process_shard(device: str = "cpu") -> tuple[int, int] | None:
    """(rank, world size) when this process is one of several under torch.distributed (started by torchrun:
    the process group is initialised here if the launcher has not, gloo for a CPU run, NCCL with each
    process on its own GPU for ``device`` cuda), else None."""
    if not distributed() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1))
        # process 0 alone featurizes the training data and runs the teacher's beams while the others wait at a
        # barrier: allow that hours, not the default 30 minutes
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                             timeout=datetime.timedelta(hours=6))
    if distributed() and torch.distributed.get_world_size() > 1:
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return None


def run_method(name: str, config, *, model: str | None, out: Path, calib: CalibConfig | None = None,
               evaluation: EvalConfig | None = None, resume: bool = False, log: Log = lambda line: None,
               progress: Progress | None = None) -> dict | None:
    """Compress ``model`` with the registered method ``name`` and its ``config`` into ``out``; returns the
    report. A calibrated config reads ``calib`` (the bundled calibration sample when None or its path is None);
    ``resume`` continues a resumable method's interrupted run in ``out``.

    Under torchrun, every process featurizes and walks its shard of the calibration batches, the statistics
    are summed over the processes before each solve (so all compute the one-process result), and process 0
    alone logs, evaluates and writes ``out``; the others return None."""
    method = get_method(name)
    out = Path(out)
    if not isinstance(config, method.config_class):
        raise TypeError(f"{name} takes a {method.config_class.__name__}, got {type(config).__name__}")
    config.check()
    check_output(out)
    if resume and not method.resumable:
        raise AsrshrinkError(f"{name} runs cannot be resumed; start it again without --resume")
    if method.unused_calib and not method.calibrated(config) and calib is not None and calib.path is not None:
        raise AsrshrinkError(method.unused_calib)
    shard = process_shard(getattr(config, "device", "cpu"))
    if shard is not None and shard[0] != 0:  # a helper process: computes its share, writes nothing
        _run_method(method, config, None, model=model, calib=calib, evaluation=evaluation, resume=resume,
                    out=out, log=lambda line: None, progress=None)
        return None
    with OutputFolder(out, owned=OWNED) as folder:
        if not resume:
            _refuse_interrupted(out, name)
        try:
            return _run_method(method, config, folder, model=model, calib=calib, evaluation=evaluation,
                               resume=resume, out=out, log=log, progress=progress)
        except KeyboardInterrupt:  # the progress checkpoint stays (resume with --resume OUT) if there is one
            if not (out / PROGRESS / method.checkpoint_file).is_file():
                shutil.rmtree(out / PROGRESS, ignore_errors=True)
            raise
        except BaseException:
            if method.resumable and not resume:
                shutil.rmtree(out / PROGRESS, ignore_errors=True)  # this run's own, useless after an error
            raise


def run_options(name: str, info, config, calib: CalibConfig | None, evaluation: EvalConfig | None) -> dict:
    """The full record of a run's options, as saved for ``resume`` (paths absolute): one section per part of
    the method's config (svd, psvd; or the config itself under the method's name), calib and evaluation."""
    parts = {f.name: to_json(_absolute(getattr(config, f.name))) for f in fields(config)} \
        if all(is_dataclass(getattr(config, f.name)) for f in fields(config)) else {name: to_json(_absolute(config))}
    return {"command": name, "model": str(info.path.resolve()), "source_sha256": info.sha256, **parts,
            "calib": to_json(_absolute(calib)) if calib else None,
            "evaluation": to_json(_absolute(evaluation)) if evaluation else None}


def _run_method(method, config, folder: OutputFolder | None, *, model: str | None, calib: CalibConfig | None,
                evaluation: EvalConfig | None, resume: bool, out: Path, log: Log, progress: Progress | None
                ) -> dict | None:
    """The run itself; with ``folder`` None (a helper process under torchrun) nothing is written."""
    started = time.perf_counter()
    original, info = load_model(model)
    if original.arbitrator is not None:  # its branched layers expose no matrices: a method would skip them
        raise AsrshrinkError(f"{info.path}: an AmNet model (branched encoder layers and an arbitrator); "
                             f"{method.name} compresses models without branches: run it on the model before "
                             f"amnet-finetune, then amnet-finetune its output")
    if original.sharing is not None and not method.shared_models:
        raise AsrshrinkError(f"{info.path}: a model that shares weights across layers (asrshrink share); "
                             f"{method.name} would replace shared modules one layer at a time: run {method.name} "
                             f"on the model before sharing, or repair the shared model with distill")
    if method.check_model is not None:
        method.check_model(config, original)
    eval_set = _open_eval(original, evaluation) if folder is not None else None  # process 0 evaluates
    progress_dir = out / PROGRESS
    calibrated = method.calibrated(config)
    if calibrated:
        calib = calib or CalibConfig()
        calib.check()
    record = run_options(method.name, info, config, calib if calibrated else None, evaluation)
    state = (method.read_progress or _read_state)(progress_dir) if resume else None
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
    if calibrated:
        batches, calib_used = _calibration(original, calib, log, progress)
    earlier_seconds = state["seconds"] if state else 0.0
    if method.resumable and state is None and folder is not None:
        write_json_atomic(progress_dir / "options.json", record)

    def checkpoint(model, saved: dict) -> None:
        save_model(model, progress_dir / MODEL_FILENAME, source_sha256=info.source_sha256, extra={
            "psvd_progress": {"source_sha256": info.sha256, "options": record, **saved,
                              "seconds": earlier_seconds + time.perf_counter() - started}})

    resumed = state is not None and method.read_progress is None
    ctx = Context(original, batches, log, progress=state,
                  resumed_model=load_model(progress_dir / MODEL_FILENAME)[0] if resumed else None,
                  checkpoint=checkpoint if method.resumable and folder is not None else None,
                  progress_dir=progress_dir, resume=state is not None, bar=progress, source_sha256=info.sha256,
                  source_path=info.path)
    outcome = method.core(config, ctx)
    if folder is None:
        return None
    options = {"model": str(info.path.resolve()), **method.options(config)}
    if calib_used is not None:
        options.update(calib=to_json(_absolute(calib)), calib_used=calib_used)
    evaluated = _evaluate_both(original, outcome.model, eval_set, log, progress) if eval_set is not None else None
    if evaluated is not None and method.evaluate is not None:
        evaluated["figures"] = method.evaluate(config, original, outcome.model, eval_set, log, progress)
    return _publish(folder, method.name, outcome.model, info, original, options=options, layers=outcome.layers,
                    post_training=outcome.post_training, seconds=earlier_seconds + time.perf_counter() - started,
                    evaluated=evaluated, figures=outcome.figures)


def _publish(folder: OutputFolder, command: str, compressed, info, original, *, options: dict, layers: list,
             seconds: float, evaluated: dict | None, post_training: list | None = None,
             figures: dict | None = None) -> dict:
    """Stage model.safetensors, report.json and report.md, then publish them together into ``folder.out``
    (which drops any progress checkpoint there)."""
    staged = save_model(compressed, folder.staging, source_sha256=info.source_sha256,
                        extra={"method": {"command": command, "options": options}})
    report = build_report(
        command, source={"path": str(info.path), "sha256": info.sha256, "family": original.family},
        output=staged, options=options, before=describe(original), after=describe(compressed),
        layers=layers, post_training=post_training, seconds=seconds, evaluation=evaluated, figures=figures)
    report["output"]["path"] = str(folder.out / MODEL_FILENAME)
    write_report(folder.staging, report)
    folder.publish()
    return report


def run(command: str, *, svd: SvdConfig, post: PsvdConfig | None = None, **kwargs) -> dict:
    """``run_method`` for the svd and psvd methods, their configs given apart."""
    if (command == "psvd") != (post is not None):
        raise AsrshrinkError("psvd runs take a PsvdConfig (post), svd runs none")
    return run_method(command, PsvdRunConfig(svd, post) if post is not None else svd, **kwargs)


def prune(*, config: PruneConfig, **kwargs) -> dict:
    """``run_method`` for the prune method."""
    return run_method("prune", config, **kwargs)


def _open_eval(model, evaluation: EvalConfig | None):
    """The --eval dataset, with every file's header read now (missing, unreadable or too-short audio is
    reported before the compute, not after it)."""
    if evaluation is None or not evaluation.path:
        return None
    if evaluation.limit is not None and evaluation.limit < 1:
        raise AsrshrinkError(f"--eval-limit must be at least 1, got {evaluation.limit}")
    dataset = open_dataset(evaluation.path, vocabulary=model.vocabulary,
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
        dataset = open_dataset(calib.path or bundled_speech("calib", "--calib"), vocabulary=model.vocabulary,
                                   sample_rate=model.feature_config.sample_rate,
                                   max_duration=calib.max_duration, limit=calib.num_utterances, seed=calib.seed)
    except DataError as exc:
        if "longer than the maximum duration" not in str(exc):
            raise
        raise DataError(f"{calib.path}: every --calib utterance is longer than {calib.max_duration:g} s, the "
                        f"longest a calibration utterance may be; pass --calib data with shorter "
                        f"utterances") from None
    check_audio(model, dataset, "--calib")
    shard = process_shard()
    batches = calibration_batches(model, dataset, batch_size=calib.batch_size, shard=shard,
                                  progress=(lambda d, t: progress("featurizing calibration audio", d, t))
                                  if progress else None)
    if shard is not None:  # every process learns that one of them has nothing, and all refuse alike
        empty = torch.tensor([float(not batches)])
        all_reduce(empty)
        if float(empty):
            raise DataError(f"{dataset.source}: {len(dataset)} calibration utterances for {shard[1]} processes; "
                            f"use more --num-utterances or fewer processes")
    frames = torch.tensor(float(sum(int(b["feature_lengths"].sum()) for b in batches)), dtype=torch.float64)
    all_reduce(frames)
    frames = int(frames)
    log(f"calibration: {len(dataset)} utterances from {dataset.source}, {frames} feature frames"
        + (f", shared by {shard[1]} processes" if shard else ""))
    return batches, {"data": str(dataset.source), "utterances": len(dataset), "feature_frames": frames}


#: Config fields that name files: made absolute in a run's record, so a resumed run finds them from any folder.
PATH_FIELDS = ("path", "data", "teacher")


def _absolute(config):
    """The config with its file paths (``PATH_FIELDS``) made absolute."""
    if config is None:
        return config
    paths = {f: str(Path(getattr(config, f)).resolve()) for f in PATH_FIELDS if getattr(config, f, None)}
    return type(config)(**{**config.__dict__, **paths}) if paths else config


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
        result = evaluate(model, dataset, progress=(lambda d, t, n=name: progress(f"evaluating ({n})", d, t))
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
    """Continue the interrupted run of a resumable method (psvd, distill) in ``out`` with the options it was
    started with.

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
        method = get_method(saved["command"])
        parts = typing.get_type_hints(method.config_class)
        if all(is_dataclass(parts[f.name]) for f in fields(method.config_class)):  # one section per part (psvd)
            config = method.config_class(**{f.name: from_json(parts[f.name], saved[f.name])
                                            for f in fields(method.config_class)})
        else:  # the config as one section, named by the method
            config = from_json(method.config_class, saved[saved["command"]])
        calib = from_json(CalibConfig, saved["calib"]) if saved["calib"] else None
        evaluation = from_json(EvalConfig, saved["evaluation"]) if saved["evaluation"] else None
        source = saved["model"]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise AsrshrinkError(f"{path}: unreadable ({type(exc).__name__}: {exc}); delete {out / PROGRESS} "
                             f"and start the run again") from None
    return run_method(saved["command"], config, model=source, out=out, calib=calib, evaluation=evaluation,
                      resume=True, log=log, progress=progress)


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return "(none)" if value is None else str(value)

