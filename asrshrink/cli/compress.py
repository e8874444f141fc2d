"""The ``svd``, ``psvd`` and ``prune`` commands: options -> configs -> ``asrshrink.compress`` -> a summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from asrshrink.cli.main import BUNDLED_HELP, ModelArg, app, data_path, err, handle_errors, progress_bar

COMPONENTS = {"encoder": ("encoder",), "prediction": ("prediction",), "joint": ("joint",),
              "all": ("encoder", "prediction", "joint")}

Out = Annotated[Path, typer.Option("-o", "--output", help="Output directory (model.safetensors, report.json, "
                                                          "report.md).")]
Threshold = Annotated[float, typer.Option("--rank-threshold", help="Keep the top ceil(T * min(m, n)) singular "
                                                                   "values of each weight matrix.")]
Rank = Annotated[Optional[int], typer.Option(help="An explicit rank for every matrix (overrides the threshold).")]
Mode = Annotated[str, typer.Option(help="stacked: the four gates as one matrix (the paper's default); rollout: "
                                        "each gate on its own.")]
Components = Annotated[str, typer.Option(help="encoder, prediction, joint or all.")]
DataAware = Annotated[bool, typer.Option("--data-aware/--plain", help="Truncate W S instead of W, with S the "
                                                                      "Cholesky factor of the calibration inputs' "
                                                                      "second moment (needs --calib).")]
Calib = Annotated[Optional[Path], typer.Option(help=f"Calibration speech (any --data layout; {BUNDLED_HELP}); "
                                                    "default: bundled:calib.", show_default=False, parser=data_path)]
NumUtts = Annotated[int, typer.Option(help="Calibration utterances (a seeded random subset).")]
Seed = Annotated[int, typer.Option(help="Seed of the calibration and evaluation subsets.")]
Eval = Annotated[Optional[Path], typer.Option("--eval", help=f"Dataset on which to report WER before and after "
                                                             f"({BUNDLED_HELP}).", show_default=False,
                                              parser=data_path)]
EvalLimit = Annotated[Optional[int], typer.Option(help="Evaluate a seeded random subset of N utterances.")]
Json = Annotated[bool, typer.Option("--json", help="Print the report as one JSON object on stdout.")]
Ratio = Annotated[Optional[float], typer.Option(help="Per-layer ranks under a global budget: the chosen components "
                                                     "shrink by this factor; the ranks go where the measured "
                                                     "per-layer error drops most per parameter.")]
Targets = Annotated[Optional[list[str]], typer.Option(
    "--targets", help="Compress only the weight matrices whose module name matches this pattern (* matches "
                      "dots too; repeat for several), e.g. 'encoder.layers.*.feed_forward*'.", show_default=False)]
Ignore = Annotated[Optional[list[str]], typer.Option(
    "--ignore", help="Leave the matrices whose module name matches this pattern as they are (repeatable), e.g. "
                     "'*.linear_pos'.", show_default=False)]
TargetParams = Annotated[Optional[int], typer.Option(help="Per-layer ranks under a global budget: the whole model "
                                                          "keeps at most this many parameters.")]


TrainingData = Annotated[Optional[Path], typer.Option(help="Training speech (any --data layout). Required.",
                                                     show_default=False, parser=data_path)]


def _explicit(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option ``name`` (on the command line or through the environment)."""
    source = ctx.get_parameter_source(name)  # compared by name: Typer may bring its own copy of click's enum
    return getattr(source, "name", None) in ("COMMANDLINE", "ENVIRONMENT")


def _given_options(ctx: typer.Context, options: dict[str, tuple]) -> dict[str, tuple]:
    """{option: (section, field, value)} for the options the user gave explicitly."""
    return {flag: (section, field, value) for name, (flag, section, field, value) in options.items()
            if _explicit(ctx, name)}


def _components(value: str) -> tuple[str, ...]:
    from asrshrink.errors import AsrshrinkError

    if value not in COMPONENTS:
        raise AsrshrinkError(f"--components must be one of {', '.join(COMPONENTS)}, got {value!r}")
    return COMPONENTS[value]


def _calib(path: Path | None, num_utterances: int, seed: int):
    from asrshrink.config import CalibConfig

    return CalibConfig(path=str(path) if path else None, num_utterances=num_utterances, seed=seed)


def _evaluation(path: Path | None, limit: int | None, seed: int):
    from asrshrink.compress import EvalConfig

    return EvalConfig(path=str(path) if path else None, limit=limit, seed=seed)


class _Bars:
    """A rich progress bar per long step, created on first use."""

    def __init__(self, bar):
        self.bar, self.tasks = bar, {}

    def __call__(self, description: str, done: int, total: int) -> None:
        if description not in self.tasks:
            self.tasks[description] = self.bar.add_task(description, total=total)
        self.bar.update(self.tasks[description], completed=done)


def _run(name: str, json_out: bool, config=None, *, resume_run: bool = False, **kwargs) -> None:
    """Run the registered method ``name`` with ``config`` (or resume its interrupted run), showing progress,
    then print its summary."""
    from asrshrink import compress
    from asrshrink.methods.registry import get_method

    method = get_method(name)
    with progress_bar("") as bar:
        def log(line: str) -> None:
            bar.console.print(line, markup=False, highlight=False, soft_wrap=True)

        try:
            if resume_run:
                report = compress.resume(kwargs["out"], given=kwargs.get("given"), model=kwargs.get("model"),
                                         log=log, progress=_Bars(bar))
            else:
                report = compress.run_method(name, config, log=log, progress=_Bars(bar), **kwargs)
        except KeyboardInterrupt:
            from asrshrink.compress import PROGRESS

            if not method.resumable:
                log("interrupted; nothing was written")
            elif (Path(kwargs["out"]) / PROGRESS / method.checkpoint_file).is_file():
                log(f"interrupted; continue with: asrshrink {name} --resume {kwargs['out']}")
            else:
                log("interrupted before the first layer was finished; nothing to resume")
            raise typer.Exit(130) from None
    if report is None:  # a helper process under torchrun: process 0 writes and reports
        return
    SUMMARIES.get(name, _summary)(report)
    if json_out:
        print(json.dumps(report))


def _prune_summary(report: dict) -> None:
    b, a = report["before"], report["after"]
    table = Table(title=f"asrshrink prune -> {report['output']['path']}")
    for column in ("", "params", "non-zero", "MB dense", "MB sparse", "WER %"):
        table.add_column(column, justify="right")
    e = report["eval"]
    for name, d in (("before", b), ("after", a)):
        table.add_row(name, f"{d['params']:,}", f"{d['nonzero_params']:,}", f"{d['bytes'] / 1e6:.2f}",
                      f"{d['sparse_bytes'] / 1e6:.2f}", f"{e[name]['wer']:.2f}" if e else "-")
    err.print(table)
    storage = report["compression_ratio"]["storage"]
    err.print(f"sparse storage (bit mask + float32 non-zeros) {storage['model']:.2f}x smaller (encoder "
              f"{storage['by_component'].get('encoder', 1):.2f}x) in {report['seconds']:.1f} s")


def _summary(report: dict) -> None:
    b, a = report["before"], report["after"]
    table = Table(title=f"asrshrink {report['command']} -> {report['output']['path']}")
    for column in ("", "params", "MB", "encoder MFLOPs/frame", "WER %"):
        table.add_column(column, justify="right")
    e = report["eval"]
    for name, d in (("before", b), ("after", a)):
        table.add_row(name, f"{d['params']:,}", f"{d['bytes'] / 1e6:.2f}",
                      f"{d['flops']['encoder_per_frame'] / 1e6:.2f}", f"{e[name]['wer']:.2f}" if e else "-")
    err.print(table)
    err.print(f"compression ratio {report['compression_ratio']['model']:.2f}x (encoder "
              f"{report['compression_ratio']['by_component'].get('encoder', 1):.2f}x) in {report['seconds']:.1f} s")


#: A method's terminal summary, where it differs from the low-rank one (sizes, FLOPs, WER).
SUMMARIES = {"prune": _prune_summary}


@app.command("svd")
@handle_errors
def svd_command(
    model: ModelArg = None, out: Out = Path("svd-out"), rank_threshold: Threshold = 0.2, rank: Rank = None,
    mode: Mode = "stacked", components: Components = "encoder", data_aware: DataAware = False,
    calib: Calib = None, num_utterances: NumUtts = 400, seed: Seed = 0, eval_data: Eval = None,
    eval_limit: EvalLimit = None, compression_ratio: Ratio = None, target_params: TargetParams = None,
    targets: Targets = None, ignore: Ignore = None,
    structure: Annotated[str, typer.Option(
        help="factors: each matrix as low-rank factors U (V x); projection: each LSTM layer as an LSTM with a "
             "projection of rank r (torch.nn.LSTM proj_size=r) whose output m = P h feeds the recurrence and "
             "the next layer or joint, P from the SVD of the matrices that read h (LSTM layers only; the "
             "rank options give one rank per layer).")] = "factors",
    json_out: Json = False,
) -> None:
    """Low-rank factorisation (truncated SVD) of LSTM and Linear weights; a factorised layer computes
    W x as U (V x), so the saving is real in FLOPs and parameters. Matrices where a factorisation would not
    save (rank >= m n / (m + n)) stay dense, and the report says so. With --structure projection, each LSTM
    layer instead gets a projection of its hidden state (an LSTMP layer, eq. 11 of "Compression of end-to-end
    models"), where it saves.

    Example: asrshrink svd rnnt.pt --rank-threshold 0.2 -o out/ --eval LibriSpeech/dev-clean

    Example: asrshrink svd rnnt.pt --structure projection --rank-threshold 0.2 --data-aware -o out/

    Example: asrshrink svd model.nemo --compression-ratio 2 --data-aware --targets 'encoder.layers.*.feed_forward*'
    --targets 'encoder.layers.*.self_attn.*' --ignore '*.linear_pos' -o out/
    """
    from asrshrink.config import SvdConfig

    _run("svd", json_out, model=model, out=out,
         config=SvdConfig(threshold=rank_threshold, rank=rank, mode=mode, components=_components(components),
                          data_aware=data_aware, compression_ratio=compression_ratio, target_params=target_params,
                          targets=tuple(targets or ()), ignore=tuple(ignore or ()), structure=structure),
         calib=_calib(calib, num_utterances, seed),
         evaluation=_evaluation(eval_data, eval_limit, seed))


@app.command("psvd")
@handle_errors
def psvd_command(
    ctx: typer.Context,
    model: ModelArg = None, out: Out = Path("psvd-out"), calib: Calib = None, rank_threshold: Threshold = 0.2,
    rank: Rank = None, iterations: Annotated[int, typer.Option(help="Passes over the layers, first to last.")] = 3,
    num_utterances: NumUtts = 400, mode: Mode = "stacked", components: Components = "encoder",
    variant: Annotated[str, typer.Option(help="paper: fit the input and recurrent sides separately (Algorithm 1); "
                                              "joint: fit both to the summed pre-activation.")] = "paper",
    data_aware: DataAware = False, seed: Seed = 0, eval_data: Eval = None, eval_limit: EvalLimit = None,
    compression_ratio: Ratio = None, target_params: TargetParams = None,
    refits: Annotated[int, typer.Option(help="Least-squares fits per layer and iteration; each refit uses the "
                                             "refitted layer's own hidden states (1: the paper).")] = 1,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the interrupted run in this output directory "
                                                        "(its options are reused).", show_default=False)] = None,
    targets: Targets = None, ignore: Ignore = None, json_out: Json = False,
) -> None:
    """SVD, then PSVD: layer-sequential least-squares post-training on calibration speech, no backprop.

    Each factorised LSTM layer, first to last, is refitted so its input-side and recurrent-side
    pre-activations match the uncompressed model's, with its inputs taken from the already-compressed layers;
    on a Conformer, each factorised Linear of each block in forward order, to the uncompressed Linear's
    outputs. Repeated --iterations times. One log line per matrix; resumable with --resume OUT.

    Example: asrshrink psvd rnnt.pt --calib LibriSpeech/dev-clean --rank-threshold 0.2 -o out/
    """
    from asrshrink.config import PsvdConfig, PsvdRunConfig, SvdConfig

    if resume is not None:
        given = _given_options(ctx, {
            "rank_threshold": ("--rank-threshold", "svd", "threshold", rank_threshold),
            "rank": ("--rank", "svd", "rank", rank), "mode": ("--mode", "svd", "mode", mode),
            "components": ("--components", "svd", "components", COMPONENTS.get(components, components)),
            "data_aware": ("--data-aware", "svd", "data_aware", data_aware),
            "compression_ratio": ("--compression-ratio", "svd", "compression_ratio", compression_ratio),
            "target_params": ("--target-params", "svd", "target_params", target_params),
            "calib": ("--calib", "calib", "path", str(calib.resolve()) if calib else None),
            "num_utterances": ("--num-utterances", "calib", "num_utterances", num_utterances),
            "seed": ("--seed", "calib", "seed", seed),
            "iterations": ("--iterations", "psvd", "iterations", iterations),
            "variant": ("--variant", "psvd", "variant", variant), "refits": ("--refits", "psvd", "refits", refits),
            "eval_data": ("--eval", "evaluation", "path", str(eval_data.resolve()) if eval_data else None),
            "eval_limit": ("--eval-limit", "evaluation", "limit", eval_limit),
            "targets": ("--targets", "svd", "targets", tuple(targets or ())),
            "ignore": ("--ignore", "svd", "ignore", tuple(ignore or ()))})
        if _explicit(ctx, "out") and out.resolve() != resume.resolve():
            from asrshrink.errors import AsrshrinkError

            raise AsrshrinkError(f"-o {out} contradicts --resume {resume}: a resumed run writes into the folder it "
                                 f"resumes; drop -o")
        _run("psvd", json_out, out=resume, resume_run=True, given=given, model=model)
        return
    comps = _components(components)
    svd = SvdConfig(threshold=rank_threshold, rank=rank, mode=mode, components=comps, data_aware=data_aware,
                    compression_ratio=compression_ratio, target_params=target_params, targets=tuple(targets or ()),
                    ignore=tuple(ignore or ()))
    post = PsvdConfig(iterations=iterations, variant=variant, refits=refits,
                      components=tuple(c for c in comps if c != "joint"))
    _run("psvd", json_out, model=model, out=out, config=PsvdRunConfig(svd, post),
         calib=_calib(calib, num_utterances, seed),
         evaluation=_evaluation(eval_data, eval_limit, seed))


@app.command("prune")
@handle_errors
def prune_command(
    model: ModelArg = None, out: Out = Path("prune-out"),
    sparsity: Annotated[Optional[float], typer.Option(
        help="Fraction of each chosen matrix's weights set to zero, in [0, 1) (with --global: of all chosen "
             "weights together). Required.", show_default=False)] = None,
    global_threshold: Annotated[bool, typer.Option(
        "--global/--per-layer", help="One magnitude threshold across all chosen matrices sets each matrix's share "
                                     "of --sparsity (the method then picks the weights within each), instead of "
                                     "every matrix at --sparsity.")] = False,
    components: Components = "encoder",
    method: Annotated[str, typer.Option(help="magnitude: smallest |w|; sparsegpt: OBS column-by-column updates "
                                             "from the layer inputs' statistics; wanda: smallest |w| ||x|| per "
                                             "output. sparsegpt and wanda read --calib.")] = "magnitude",
    calib: Calib = None, num_utterances: NumUtts = 400, seed: Seed = 0, eval_data: Eval = None,
    eval_limit: EvalLimit = None,
    pattern: Annotated[Optional[str], typer.Option(
        help="N:M semi-structured sparsity: keep N of every M consecutive weights of each row (e.g. 2:4, a "
             "sparsity of 0.5; --sparsity may then be left out).", show_default=False)] = None,
    targets: Targets = None, ignore: Ignore = None, json_out: Json = False,
) -> None:
    """Unstructured pruning of LSTM input and recurrent matrices (and Linear weights of the chosen components).

    Pruned weights are stored as exact zeros in dense matrices; the model file records each matrix's
    non-zeros, and the report gives sizes dense (float32) and as sparse storage (a bit mask plus the float32
    non-zeros). With --method sparsegpt or wanda, the encoder's (and prediction network's) matrices are pruned
    first to last on calibration speech, each with its inputs from the already-pruned matrices; the joint's
    Linears are pruned by magnitude.

    Example: asrshrink prune rnnt.pt --sparsity 0.7 --method sparsegpt -o out/ --eval LibriSpeech/dev-clean

    Example: asrshrink prune model.nemo --pattern 2:4 --method sparsegpt -o out/
    """
    from asrshrink.config import PruneConfig

    if sparsity is None and pattern is None:
        from asrshrink.errors import AsrshrinkError

        raise AsrshrinkError("--sparsity is required: the fraction of weights to set to zero, e.g. --sparsity 0.5 "
                             "(or an N:M --pattern such as 2:4)")
    if sparsity is None:
        n, _, m = pattern.partition(":")
        sparsity = 1 - int(n) / int(m) if n.isdigit() and m.isdigit() and int(m) > 0 else 0.0
    config = PruneConfig(sparsity=sparsity, method=method, components=_components(components),
                         global_threshold=global_threshold, pattern=pattern, targets=tuple(targets or ()),
                         ignore=tuple(ignore or ()))
    _run("prune", json_out, model=model, out=out, config=config,
         calib=_calib(calib, num_utterances, seed) if config.calibrated or calib else None,
         evaluation=_evaluation(eval_data, eval_limit, seed))


def _resume_training(ctx: typer.Context, command: str, out: Path, resume: Path, json_out: bool, model, *,
                     options: dict, paths: dict) -> None:
    """``--resume`` of a training-time command: the options given on the command line (``options``, config
    field -> value; ``paths``, config field -> Path or None) must agree with the resumed run's, and -o, if
    given, must be the folder it resumes."""
    given = _given_options(ctx, {name: (f"--{name.replace('_', '-')}", command, name, value)
                                 for name, value in options.items()})
    for name, path in paths.items():
        if path is not None:
            given[f"--{name.replace('_', '-')}"] = (command, name, str(path.resolve()))
    if _explicit(ctx, "out") and out.resolve() != resume.resolve():
        from asrshrink.errors import AsrshrinkError

        raise AsrshrinkError(f"-o {out} contradicts --resume {resume}: a resumed run writes into the folder it "
                             f"resumes; drop -o")
    _run(command, json_out, out=resume, resume_run=True, given=given, model=model)


@app.command("distill")
@handle_errors
def distill_command(
    ctx: typer.Context,
    model: ModelArg = None, out: Out = Path("distill-out"),
    data: TrainingData = None,
    teacher: Annotated[Optional[Path], typer.Option(help="The teacher model; default MODEL itself (with "
                                                         "--student-config).", show_default=False)] = None,
    student_config: Annotated[Optional[str], typer.Option(
        help="Distill into a fresh model of MODEL's family with these config fields changed (a JSON object, "
             "e.g. '{\"encoder_hidden\": 128}') instead of fine-tuning MODEL.", show_default=False)] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 300,
    lr: Annotated[float, typer.Option(help="Peak learning rate (warm-up, then cosine decay).")] = 5e-4,
    max_frames: Annotated[int, typer.Option(help="Padded feature frames per batch (per process).")] = 3000,
    max_batch: Annotated[int, typer.Option(help="Utterances per batch (per process).")] = 32,
    spec_augment: Annotated[bool, typer.Option(help="SpecAugment the training features.")] = True,
    kd_weight: Annotated[float, typer.Option(help="Weight of the lattice distillation term (0: ground truth "
                                                  "only).")] = 1.0,
    rnnt_weight: Annotated[float, typer.Option(help="Weight of the transducer loss on the ground truth.")] = 1.0,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of both distributions.")] = 1.0,
    collapsed: Annotated[bool, typer.Option(help="Compare the collapsed {next label, blank, rest} distributions "
                                                 "instead of the full ones (large vocabularies).")] = False,
    objective: Annotated[str, typer.Option(help="The lattice of the KD term: truth (the ground-truth labels), "
                                                "top-beam (the teacher's best beam hypothesis) or beam (all "
                                                "--beam hypotheses, weighted by their normalised "
                                                "probabilities).")] = "truth",
    beam: Annotated[int, typer.Option(help="Beam width of the teacher's hypotheses (computed once per run).")] = 4,
    pseudo_weight: Annotated[float, typer.Option(help="Weight of the transducer loss on the teacher's top "
                                                      "hypothesis (a pseudo-label).")] = 0.0,
    prune_to: Annotated[Optional[float], typer.Option(help="Gradual magnitude pruning of the --components' "
                                                           "matrices to this sparsity (cubic schedule).",
                                                      show_default=False)] = None,
    prune_from: Annotated[int, typer.Option(help="Step at which pruning starts.")] = 0,
    prune_until: Annotated[Optional[int], typer.Option(help="Step at which --prune-to is reached (default: "
                                                            "--steps).", show_default=False)] = None,
    prune_every: Annotated[int, typer.Option(help="Steps between mask updates.")] = 20,
    teacher_cache: Annotated[Optional[Path], typer.Option(
        help="Folder for the teacher's beams and lattice posteriors, computed once on the unaugmented --data and "
             "reused by later runs with the same teacher, data and options (the teacher is then not loaded).",
        show_default=False)] = None,
    device: Annotated[str, typer.Option(help="Where to train: cpu, cuda or cuda:N (under torchrun, cuda is each "
                                             "process's own GPU).")] = "cpu",
    components: Components = "encoder", seed: Seed = 0, eval_data: Eval = None, eval_limit: EvalLimit = None,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between training checkpoints.")] = 50,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the interrupted run in this output directory "
                                                        "(its options are reused).", show_default=False)] = None,
    json_out: Json = False,
) -> None:
    """Transducer distillation: fine-tune a student on speech against the ground truth and the teacher's
    distributions over the label lattice (KL at every (t, u) node), optionally pruning it gradually; resumable
    exactly (Ctrl-C checkpoints; --resume continues).

    The student is MODEL (any asrshrink output: svd, psvd, prune) with --teacher, or a fresh, smaller model of
    MODEL's family (--student-config) with MODEL as the teacher.

    On several processes: torchrun --standalone --nproc-per-node 2 -m asrshrink distill ... (each process
    takes its share of every global batch of --max-batch x processes utterances; process 0 writes).

    Example: asrshrink distill psvd-out/ --teacher rnnt.pt --data train/ --steps 500 -o distilled/ --eval dev/

    Example: asrshrink distill psvd-out/ --teacher rnnt.pt --data train/ --collapsed --teacher-cache kd-cache/ -o out/
    """
    from asrshrink.config import DistillConfig

    if resume is not None:
        _resume_training(ctx, "distill", out, resume, json_out, model, options=dict(
            steps=steps, lr=lr, kd_weight=kd_weight, rnnt_weight=rnnt_weight, objective=objective, prune_to=prune_to,
            max_frames=max_frames, max_batch=max_batch, device=device),
            paths=dict(teacher_cache=teacher_cache, data=data, teacher=teacher))
        return
    config = DistillConfig(data=str(data) if data else "", teacher=str(teacher) if teacher else None,
                           student_config=student_config, steps=steps, lr=lr, max_frames=max_frames,
                           max_batch=max_batch, spec_augment=spec_augment,
                           kd_weight=kd_weight, rnnt_weight=rnnt_weight, temperature=temperature,
                           collapsed=collapsed, objective=objective, beam=beam, pseudo_weight=pseudo_weight,
                           prune_to=prune_to, prune_from=prune_from, prune_until=prune_until,
                           prune_every=prune_every, components=_components(components), seed=seed,
                           checkpoint_every=checkpoint_every, teacher_cache=str(teacher_cache) if teacher_cache
                           else None, device=device)
    _run("distill", json_out, model=model, out=out, config=config, evaluation=_evaluation(eval_data, eval_limit, seed))


def _amnet_summary(report: dict) -> None:
    _summary(report)
    figures = (report.get("eval") or {}).get("figures")
    if figures:
        from asrshrink.evaluate.amnet import figure_lines

        for line in figure_lines(figures):
            if line:
                err.print(line, markup=False, highlight=False, soft_wrap=True)


SUMMARIES["amnet-finetune"] = _amnet_summary


@app.command("amnet-finetune")
@handle_errors
def amnet_command(
    ctx: typer.Context,
    model: ModelArg = None, out: Out = Path("amnet-out"),
    data: TrainingData = None,
    branches: Annotated[str, typer.Option(help="mf: slow and fast branches from one SVD of each matrix (the fast "
                                               "one uses the first ranks of the slow one's factors); sparse: two "
                                               "nested magnitude masks over the same weights.")] = "mf",
    slow_compression: Annotated[Optional[float], typer.Option(
        help="Share of each matrix removed on the slow branch (mf: parameters, sparse: weights); default the "
             "paper's (mf 0.35, sparse 0.15).", show_default=False)] = None,
    fast_compression: Annotated[Optional[float], typer.Option(
        help="The same for the fast branch; default the paper's (mf 0.60, sparse 0.80).", show_default=False)] = None,
    data_aware: Annotated[bool, typer.Option("--data-aware/--plain", help="mf: factors of W S (S from the --calib "
                                                                          "inputs' second moment).")] = False,
    sparse_schedule: Annotated[str, typer.Option(help="sparse: gradual (cubic schedule to --prune-until) or "
                                                      "magnitude (both masks at once).")] = "gradual",
    prune_until: Annotated[Optional[int], typer.Option(help="gradual: step at which the masks reach their "
                                                            "sparsity (default 30 % of --steps).",
                                                       show_default=False)] = None,
    prune_every: Annotated[int, typer.Option(help="gradual: steps between mask updates.")] = 20,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 300,
    lr: Annotated[float, typer.Option(help="Peak learning rate (warm-up, then cosine decay).")] = 5e-4,
    max_frames: Annotated[int, typer.Option(help="Padded feature frames per batch.")] = 3000,
    max_batch: Annotated[int, typer.Option(help="Utterances per batch.")] = 32,
    spec_augment: Annotated[bool, typer.Option(help="SpecAugment the training features.")] = True,
    loss: Annotated[str, typer.Option(help="The compute loss: avg (L_avg, mean FLOPs per frame), amr (L_amr, the "
                                           "modelled backlog's delay) or avg-then-amr (the paper's two stages).")
                    ] = "avg-then-amr",
    amr_steps: Annotated[Optional[int], typer.Option(help="avg-then-amr: steps of the final L_amr stage "
                                                          "(default --steps / 5).", show_default=False)] = None,
    compute_weight: Annotated[float, typer.Option(help="lambda of L_avg (FLOPs per frame relative to the dense "
                                                       "encoder); raise it for the paper's 'biased' variant.")] = 1.0,
    latency_weight: Annotated[float, typer.Option(help="lambda of L_amr (seconds of modelled delay).")] = 1.0,
    mu: Annotated[Optional[float], typer.Option(help="Device speed in FLOPs/s (2 per multiply-add; the paper's "
                                                     "650 MFLOP/s is 1.3e9 here); default 45 % of what the dense "
                                                     "encoder needs for real time.", show_default=False)] = None,
    rho: Annotated[Optional[float], typer.Option(help="Decision (encoder output) frames per second; default the "
                                                      "model's.", show_default=False)] = None,
    random_steps: Annotated[Optional[int], typer.Option(help="First steps with branches drawn 50/50 at random "
                                                             "(default: 0 for mf, the pruning phase for sparse).",
                                                        show_default=False)] = None,
    entropy_threshold: Annotated[Optional[float], typer.Option(
        help="Pre-train the arbitrator during the random steps to pick the slow branch where the original model's "
             "output entropy (nats) exceeds this (the paper: 1.5-2.5).", show_default=False)] = None,
    tau_start: Annotated[float, typer.Option(help="Gumbel-softmax temperature at the first Gumbel step.")] = 1.0,
    tau_end: Annotated[float, typer.Option(help="... annealed linearly to this at the last step.")] = 0.5,
    arbitrator_hidden: Annotated[Optional[int], typer.Option(
        help="Arbitrator LSTM units (default the paper's 128, fewer if it would exceed --max-arbitrator-share of "
             "the encoder's parameters).", show_default=False)] = None,
    arbitrator_layers: Annotated[int, typer.Option(help="Arbitrator LSTM layers.")] = 2,
    arbitrator_feedback: Annotated[bool, typer.Option(help="The arbitrator also reads its previous decision.")
                                   ] = True,
    max_arbitrator_share: Annotated[float, typer.Option(help="Largest share of the encoder's parameters the "
                                                             "default arbitrator may have.")] = 0.025,
    device: Annotated[str, typer.Option(help="Where to train: cpu, cuda or cuda:N.")] = "cpu",
    calib: Calib = None, num_utterances: NumUtts = 400, seed: Seed = 0, eval_data: Eval = None,
    eval_limit: EvalLimit = None,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between training checkpoints.")] = 50,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the interrupted run in this output directory "
                                                        "(its options are reused).", show_default=False)] = None,
    json_out: Json = False,
) -> None:
    """AmNet (amortized networks): branch MODEL's LSTM encoder into a slow and a fast branch made from its own
    weights, attach a small arbitrator that picks one per encoder frame, and fine-tune with the transducer loss
    + a compute loss (mean FLOPs, then the modelled audio backlog at --mu); resumable exactly (Ctrl-C
    checkpoints; --resume continues). The output runs with hard switching: only the chosen branch is computed.

    With --eval the report adds branch ratios, FLOPs per frame, the modelled delay per utterance at --mu and the
    encoder's wall time against MODEL.

    Example: asrshrink amnet-finetune rnnt.pt --data train/ --branches mf --steps 500 -o amnet/ --eval dev/

    Example: asrshrink amnet-finetune --data train/ --branches sparse --loss amr --mu 4e8 -o amnet-sparse/
    """
    from asrshrink.config import AmnetConfig

    if resume is not None:
        _resume_training(ctx, "amnet-finetune", out, resume, json_out, model, options=dict(
            steps=steps, lr=lr, branches=branches, loss=loss, mu=mu, max_frames=max_frames, max_batch=max_batch,
            device=device, compute_weight=compute_weight, latency_weight=latency_weight), paths=dict(data=data))
        return
    config = AmnetConfig(
        data=str(data) if data else "", branches=branches, slow_compression=slow_compression,
        fast_compression=fast_compression, data_aware=data_aware, sparse_schedule=sparse_schedule,
        prune_until=prune_until, prune_every=prune_every, steps=steps, lr=lr, max_frames=max_frames,
        max_batch=max_batch, seed=seed, checkpoint_every=checkpoint_every, spec_augment=spec_augment,
        arbitrator_hidden=arbitrator_hidden, arbitrator_layers=arbitrator_layers,
        arbitrator_feedback=arbitrator_feedback, max_arbitrator_share=max_arbitrator_share, random_steps=random_steps, entropy_threshold=entropy_threshold,
        tau_start=tau_start, tau_end=tau_end, loss=loss, amr_steps=amr_steps, compute_weight=compute_weight,
        latency_weight=latency_weight, mu=mu, rho=rho, device=device)
    _run("amnet-finetune", json_out, model=model, out=out, config=config,
         calib=_calib(calib, num_utterances, seed) if data_aware else None,
         evaluation=_evaluation(eval_data, eval_limit, seed))


def _share_summary(report: dict) -> None:
    _summary(report)
    plan = (report.get("figures") or {}).get("plan")
    if plan:
        physical = ", ".join(f"{kind} {n}" for kind, n in plan["physical"].items())
        err.print(f"{plan['virtual_layers']} virtual layers; physical modules {physical}", markup=False,
                  highlight=False)


SUMMARIES["share"] = _share_summary


def _names(value: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip()) if value else ()


@app.command("share")
@handle_errors
def share_command(
    ctx: typer.Context,
    model: ModelArg = None, out: Out = Path("share-out"),
    repeat: Annotated[Optional[str], typer.Option(
        help="R: adjacent groups of R layers share their weights (N = L / R physical blocks, each used R times in "
             "order); or one physical index per layer, e.g. 0,0,1,1,2,2. Default 2.", show_default=False)] = None,
    groups: Annotated[Optional[str], typer.Option(
        help="Groups of layers that share, as ranges, e.g. 0-1,2-3 (layers in no group keep their own "
             "weights); instead of --repeat.", show_default=False)] = None,
    share_modules: Annotated[Optional[str], typer.Option(
        help="The module kinds that share, e.g. ff1,attn,conv,ff2 (a Conformer) or lstm; default all.",
        show_default=False)] = None,
    unshare: Annotated[Optional[str], typer.Option(
        help="Sub-components that stay per layer, e.g. conv.depthwise,attn.key,misc (misc: norms, biases, batch "
             "norm, position biases).", show_default=False)] = None,
    init: Annotated[str, typer.Option(help="The shared weights: pick (the first member's), mean, or ls (the "
                                           "least-squares merge on the calibration inputs each member "
                                           "sees).")] = "ls",
    low_rank: Annotated[Optional[int], typer.Option(
        help="Factorise the --low-rank-parts at rank K (data-aware SVD of the merged weight; factors shared "
             "across the group).", show_default=False)] = None,
    low_rank_parts: Annotated[str, typer.Option(help="What --low-rank factorises: module kinds or kind.sub, "
                                                     "comma separated.")] = "ff1,ff2",
    residual_rank: Annotated[Optional[int], typer.Option(
        help="A per-layer low-rank residual of rank r from the SVD of each member's difference to the shared "
             "weight.", show_default=False)] = None,
    shared_basis: Annotated[bool, typer.Option(
        "--shared-basis", help="With --low-rank K: share only each group's input basis (K x in, from the "
                               "data-aware SVD of the members' stacked weights) and fit each layer's own "
                               "coefficients and bias on its inputs (Basis Sharing).")] = False,
    refit_iterations: Annotated[int, typer.Option(
        help="Layer-sequential least-squares refits of the per-layer parts (unshared matrices, per-layer biases, "
             "residuals, basis coefficients) on the shared model's own activations.")] = 0,
    damping: Annotated[float, typer.Option(help="ls: damping towards the members' own weights, times the mean "
                                                "diagonal of each member's Gram matrix.")] = 0.01,
    compression_ratio: Annotated[Optional[float], typer.Option(
        help="Choose the repeat factor: the encoder shrinks by this factor; the plan with the least calibration "
             "error that meets it wins.", show_default=False)] = None,
    target_params: Annotated[Optional[int], typer.Option(
        help="Choose the repeat factor: the whole model keeps at most this many parameters.",
        show_default=False)] = None,
    finetune_steps: Annotated[int, typer.Option(
        help="Repair: distillation steps (distill's loop and losses) on --data with MODEL as the teacher; "
             "resumable with --resume OUT.")] = 0,
    data: Annotated[Optional[Path], typer.Option(help="The repair's training speech (any --data layout).",
                                                 show_default=False, parser=data_path)] = None,
    finetune_lr: Annotated[float, typer.Option(help="The repair's peak learning rate.")] = 5e-4,
    checkpoint_every: Annotated[int, typer.Option(help="Repair steps between training checkpoints.")] = 50,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the interrupted repair in this output directory "
                                                        "(its options are reused).", show_default=False)] = None,
    calib: Calib = None, num_utterances: NumUtts = 400, seed: Seed = 0, eval_data: Eval = None,
    eval_limit: EvalLimit = None, json_out: Json = False,
) -> None:
    """Weight sharing across layers of a trained model (the four levels of "Sharing low rank Conformer
    weights"): repeated blocks (--repeat), shared modules (--share-modules), per-layer sub-components
    (--unshare), low rank on the shared matrices (--low-rank, --residual-rank). The shared weights come from
    the calibration data in closed form (--init ls); the output stores each shared tensor once and loads back
    with its sharing intact. Conformer encoder layers, or the MLPerf encoder's post-stack LSTM layers of equal
    shape.

    Example: asrshrink share model.nemo --repeat 2 --unshare conv.depthwise,misc -o shared/ --eval dev/

    Example: asrshrink share model.nemo --compression-ratio 2.5 --low-rank 64 --refit-iterations 1 -o shared/

    Example: asrshrink share model.nemo --repeat 2 --finetune-steps 300 --data train/ -o shared/ --eval dev/

    Example: asrshrink share model.nemo --repeat 2 --unshare misc,conv.depthwise --low-rank 40 --low-rank-parts
    ff1,attn,conv,ff2 --shared-basis -o shared/
    """
    from asrshrink.config import ShareConfig

    if resume is not None:
        given = _given_options(ctx, {
            name: (f"--{name.replace('_', '-')}", "share", name, value) for name, value in (
                ("repeat", repeat), ("groups", groups), ("init", init), ("low_rank", low_rank),
                ("residual_rank", residual_rank), ("shared_basis", shared_basis),
                ("refit_iterations", refit_iterations),
                ("finetune_steps", finetune_steps), ("finetune_lr", finetune_lr))})
        if data is not None:
            given["--data"] = ("share", "data", str(data.resolve()))
        if _explicit(ctx, "out") and out.resolve() != resume.resolve():
            from asrshrink.errors import AsrshrinkError

            raise AsrshrinkError(f"-o {out} contradicts --resume {resume}: a resumed run writes into the folder it "
                                 f"resumes; drop -o")
        _run("share", json_out, out=resume, resume_run=True, given=given, model=model)
        return
    config = ShareConfig(repeat=repeat, groups=groups, share_modules=_names(share_modules), unshare=_names(unshare),
                         init=init, damping=damping, low_rank=low_rank, low_rank_parts=_names(low_rank_parts),
                         residual_rank=residual_rank, shared_basis=shared_basis,
                         refit_iterations=refit_iterations, compression_ratio=compression_ratio,
                         target_params=target_params,
                         finetune_steps=finetune_steps, data=str(data) if data else None, finetune_lr=finetune_lr,
                         checkpoint_every=checkpoint_every, seed=seed)
    from asrshrink.methods.share import _calibrated

    _run("share", json_out, model=model, out=out, config=config,
         calib=_calib(calib, num_utterances, seed) if _calibrated(config) or calib else None,
         evaluation=_evaluation(eval_data, eval_limit, seed))
