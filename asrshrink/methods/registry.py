"""The method registry: every compressing method is a registered name with a frozen config (its own
``check()``) and a core that turns (original model, calibration batches) into a compressed model.

``asrshrink.compress.run_method`` does what all of them share (check options, load, calibrate, compress,
evaluate, save, report, resume); the CLI maps its options to a config and calls it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from asrshrink.errors import AsrshrinkError


@dataclass
class Context:
    """What a method's core is given besides its config.

    ``batches``: featurized calibration batches (empty for an uncalibrated config). ``progress``: the
    resumable progress saved by an interrupted run of this method (None for a fresh run), with
    ``resumed_model`` its partially compressed model; ``checkpoint(model, progress)`` saves progress after
    a unit of work (resumable methods only)."""

    original: Any
    batches: list = field(default_factory=list)
    log: Callable[[str], None] = lambda line: None
    progress: dict | None = None
    resumed_model: Any = None
    checkpoint: Callable[[Any, dict], None] | None = None
    #: The run's progress folder (resumable methods keep their checkpoints there) and whether this run resumes.
    progress_dir: Path | None = None
    resume: bool = False
    #: Progress of long steps: bar(description, done, total).
    bar: Callable[[str, int, int], None] | None = None
    #: The sha256 of the file MODEL was loaded from, and its path.
    source_sha256: str | None = None
    source_path: Path | None = None


@dataclass
class Outcome:
    """A method's result: the compressed model, one report row per matrix (``layers``), the rows of a
    post-training pass (``post_training``, e.g. PSVD's per-layer refits) and the method's own figures."""

    model: Any
    layers: list[dict]
    post_training: list[dict] | None = None
    #: The method's own figures, recorded in the report under ``figures`` (e.g. share's plan and candidates).
    figures: dict | None = None


@dataclass(frozen=True)
class Method:
    name: str
    config_class: type
    core: Callable[[Any, Context], Outcome]
    calibrated: Callable[[Any], bool]
    #: The options recorded in the output model and report (plus the model path and calibration record).
    options: Callable[[Any], dict] = lambda config: {k: list(v) if isinstance(v, tuple) else v
                                                      for k, v in asdict(config).items()}
    resumable: bool = False
    #: Refusal when --calib is given to a config that does not read it (None: --calib is ignored).
    unused_calib: str | None = None
    #: The file in the progress folder whose presence means an interrupted run can be resumed.
    checkpoint_file: str = "model.safetensors"
    #: Reads an interrupted run's progress record ({"source_sha256", "options", "seconds", ...}) from the
    #: progress folder; None: the record is in the checkpoint model's metadata (``checkpoint``).
    read_progress: Callable[[Path], dict | None] | None = None
    #: The method's own figures on the --eval data beside WER: (config, original, compressed, dataset, log,
    #: progress) -> dict, recorded as the report's eval.figures (None: WER only).
    evaluate: Callable[..., dict] | None = None
    #: Whether the method takes a model that shares weights across layers (``asrshrink share``'s outputs):
    #: methods that replace modules would break the ties.
    shared_models: bool = False
    #: Checks the options against the loaded model before any calibration: (config, model) -> None.
    check_model: Callable[[Any, Any], None] | None = None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    import asrshrink.methods.prune  # noqa: F401  (each method module registers itself)
    import asrshrink.methods.psvd  # noqa: F401
    import asrshrink.methods.share  # noqa: F401
    import asrshrink.methods.svd  # noqa: F401
    import asrshrink.training.amnet  # noqa: F401  (registers amnet-finetune)
    import asrshrink.training.distill  # noqa: F401  (registers distill)

    if name not in METHODS:
        raise AsrshrinkError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]
