"""The ``asrshrink`` command line: options in, library calls, results out (tables on the terminal, JSON for
machines). Errors a user can fix are printed as one line and exit with code 2."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from asrshrink import __version__

app = typer.Typer(
    name="asrshrink", no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    help="Shrink pretrained speech-recognition transducers after training.\n\n"
         "MODEL is an MLPerf RNN-T checkpoint (.pt), an asrshrink model (.safetensors) or an output directory "
         "asrshrink wrote; left out, the bundled reference model is used.")
err = Console(stderr=True)
out = Console()

ModelArg = Annotated[Optional[Path], typer.Argument(
    help="Checkpoint (.pt), asrshrink model (.safetensors) or output directory; default: the bundled model.",
    show_default=False)]


def data_path(value: str) -> Path:
    """Parser of every speech-data option: a path, or ``bundled:NAME`` for a part of the bundled speech sample
    (``bundled:v2/test-synth``), turned into that part's folder here so that everything downstream (reports,
    resume checks) sees the real path."""
    from asrshrink.audio.datasets import resolve_data_path
    from asrshrink.errors import DataError

    try:
        return resolve_data_path(value)
    except DataError as exc:
        raise typer.BadParameter(str(exc)) from None


#: Said in the help of every speech-data option.
BUNDLED_HELP = "bundled:NAME: a part of the bundled speech sample (e.g. bundled:v2/test-synth; 'bundled:' lists them)"


#: Exit code of an internal error (a bug in asrshrink, not in the user's input): neither 1 (``gate``: a bound
#: failed) nor 2 (a user error).
EXIT_INTERNAL = 3
_DISK_FULL = {"ENOSPC", "EFBIG", "EDQUOT"}
_NOT_ALLOWED = {"EACCES", "EPERM", "EROFS"}


def _os_error_line(exc: OSError) -> str:
    import errno

    where = exc.filename or ""
    name = errno.errorcode.get(exc.errno or 0, "")
    if name in _DISK_FULL:
        fix = "free disk space (or choose another output location) and run again; outputs were left as they were"
    elif name in _NOT_ALLOWED:
        fix = "choose a location you can write to, or fix its permissions"
    else:
        fix = "check the path and free space"
    return f"{where}: {exc.strerror or exc}; {fix}" if where else f"{exc.strerror or exc}; {fix}"


def handle_errors(fn: Callable) -> Callable:
    """Turn an AsrshrinkError or an OS error into one line on stderr and exit code 2 (no traceback). Any other
    exception is a bug: one line naming it, exit code 3 (set ASRSHRINK_DEBUG=1 for the traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import os

        import click

        from asrshrink.errors import AsrshrinkError

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except AsrshrinkError as exc:
            err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as exc:  # the file system refused: a full disk, a folder where a file goes, permissions
            err.print(f"error: {_os_error_line(exc)}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except MemoryError:
            err.print("error: out of memory; use a machine with more memory, or fewer utterances "
                      "(--num-utterances, --limit) or a smaller --batch-size", markup=False, highlight=False,
                      soft_wrap=True)
            raise typer.Exit(2) from None
        except Exception as exc:
            if os.environ.get("ASRSHRINK_DEBUG"):
                raise
            text = (str(exc).strip().splitlines() or [""])[0][:200]
            err.print(f"error: internal error ({type(exc).__name__}: {text}); this is a bug in asrshrink "
                      f"{__version__}, please report it with the command (ASRSHRINK_DEBUG=1 shows the traceback)",
                      markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


def progress_bar(description: str) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=err, transient=False)


def version_callback(value: bool) -> None:
    if value:
        print(f"asrshrink {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                               help="Print the version and exit.")] = False) -> None:
    pass


@app.command("eval")
@handle_errors
def eval_command(
    model: ModelArg = None,
    data: Annotated[Optional[Path], typer.Option(
        "--data", help="LibriSpeech folder, folder of audio + .txt, JSONL (NeMo) or MLPerf JSON manifest; "
                       f"{BUNDLED_HELP}; default: bundled:test.", show_default=False, parser=data_path)] = None,
    limit: Annotated[Optional[int], typer.Option(help="Evaluate a random subset of N utterances.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --limit subset.")] = 0,
    max_duration: Annotated[Optional[float], typer.Option(
        help="Drop utterances longer than this many seconds (MLPerf uses 15).")] = None,
    batch_size: Annotated[int, typer.Option(help="Utterances decoded together.")] = 32,
    beam: Annotated[Optional[int], typer.Option(
        help="Beam search of width N (scored by the best hypothesis); default: greedy decoding.",
        show_default=False)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    hypotheses: Annotated[Optional[Path], typer.Option(
        help="Write per-utterance hypotheses as JSONL (id, reference, hypothesis; score with --beam).")] = None,
    mu: Annotated[Optional[float], typer.Option(
        help="AmNet models: the device speed (FLOPs/s) of the latency model; default the one it was trained for.",
        show_default=False)] = None,
    plot: Annotated[Optional[Path], typer.Option(
        help="AmNet models: write a PNG of the branch chosen at each frame and the modelled backlog against the "
             "dense encoder's, over the longest utterance (needs matplotlib).", show_default=False)] = None,
    by: Annotated[Optional[list[str]], typer.Option(
        "--by", help="Also report WER per value of this field of the data (repeatable): a JSONL manifest's other "
                     "keys (synth, voice, augment.label, ...), a LibriSpeech tree's speaker or chapter.",
        show_default=False)] = None,
) -> None:
    """Decode a dataset (greedy, or --beam N) and report corpus WER (jiwer, word-level, as MLPerf scores).
    MODEL may also be an ONNX export directory (asrshrink export), decoded with onnxruntime.

    Example: asrshrink eval rnnt.pt --data LibriSpeech/dev-clean --max-duration 15 --beam 4 --json

    Example: asrshrink eval --data bundled:v2/test --by synth --by voice

    Example: asrshrink eval amnet/ --data dev/ --mu 1.3e9 --plot amnet-trace.png
    """
    from asrshrink.audio.datasets import open_dataset
    from asrshrink.evaluate.corpus import evaluate
    from asrshrink.io import write_text_atomic

    if plot is not None:  # before any decoding
        from asrshrink.report import check_png

        check_png(plot, "--plot")
    if hypotheses is not None and hypotheses.is_dir():
        from asrshrink.errors import AsrshrinkError

        raise AsrshrinkError(f"{hypotheses}: --hypotheses takes a file name (JSONL), not a directory")
    if hypotheses is not None:
        import os

        from asrshrink.errors import AsrshrinkError

        parent = hypotheses.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise AsrshrinkError(f"{hypotheses}: --hypotheses cannot be written there ({parent} is not a writable "
                                 f"folder); choose another file name")
    if batch_size < 1:
        from asrshrink.errors import AsrshrinkError

        raise AsrshrinkError(f"--batch-size must be at least 1, got {batch_size}")
    if beam is not None and beam < 1:
        from asrshrink.errors import AsrshrinkError

        raise AsrshrinkError(f"--beam must be at least 1 (the beam width), got {beam}; leave it out for greedy "
                             f"decoding")
    if limit is not None and limit < 1:
        from asrshrink.errors import AsrshrinkError

        raise AsrshrinkError(f"--limit must be at least 1 (utterances to evaluate), got {limit}")
    if max_duration is not None and not max_duration > 0:
        from asrshrink.errors import AsrshrinkError

        raise AsrshrinkError(f"--max-duration must be a positive number of seconds, got {max_duration}")
    from asrshrink.export.runtime import is_export, load_export
    from asrshrink.models.checkpoint import bundled_speech, load_model

    net, info = load_export(model) if is_export(model) else load_model(model)
    from asrshrink.evaluate.amnet import amnet_costs

    if plot is not None and amnet_costs(net) is None:
        from asrshrink.errors import AsrshrinkError

        raise AsrshrinkError(f"{info.path}: --plot draws an AmNet's branch decisions; this model is not an AmNet")

    dataset = open_dataset(data or bundled_speech("test", "--data"), vocabulary=net.vocabulary,
                           sample_rate=net.feature_config.sample_rate, max_duration=max_duration,
                           limit=limit, seed=seed)
    by = list(dict.fromkeys(by or ()))
    if by:  # a field the data lacks is refused before any decoding
        from asrshrink.evaluate.corpus import check_fields

        check_fields(dataset, by)
    with progress_bar("decoding") as bar:
        task = bar.add_task("decoding", total=len(dataset))
        result = evaluate(net, dataset, max_batch=batch_size, beam=beam,
                          progress=lambda done, total: bar.update(task, completed=done))
    if hypotheses is not None:
        write_text_atomic(hypotheses, "".join(json.dumps(h) + "\n" for h in result.hypotheses))
    table = Table(title=f"{info.path.name} on {dataset.source}")
    for column in ("utterances", "words", "WER %", "CER %", "audio s", "wall s", "audio s / wall s"):
        table.add_column(column, justify="right")
    table.add_row(str(result.num_utterances), str(result.num_words), f"{result.wer:.2f}", f"{result.cer:.2f}",
                  f"{result.audio_seconds:.1f}", f"{result.seconds:.1f}", f"{result.speed:.1f}")
    err.print(table)
    err.print("search: greedy" if beam is None else f"search: beam, width {beam}")
    groups = None
    if by:
        from asrshrink.evaluate.corpus import wer_by

        groups = wer_by(result.hypotheses, dataset, by)
        for name, values in groups.items():
            group_table = Table(title=f"WER by {name}")
            for column in (name, "utterances", "words", "WER %"):
                group_table.add_column(column, justify="left" if column == name else "right")
            for value, group in values.items():
                group_table.add_row(value, str(group["utterances"]), str(group["words"]), f"{group['wer']:.2f}")
            err.print(group_table)
    figures = None
    if amnet_costs(net) is not None:  # an AmNet, or its export: branch ratios, FLOPs and modelled delay
        from asrshrink.evaluate.amnet import amnet_figures, figure_lines

        options = (info.extra.get("method") or {}).get("options") or {}
        given_mu = mu if mu is not None else options.get("mu")
        with progress_bar("AmNet figures") as bar:
            task = bar.add_task("AmNet figures", total=len(dataset))
            figures = amnet_figures(net, dataset, mu=given_mu, rho=options.get("rho"),
                                    progress=lambda done, total: bar.update(task, completed=done))
        for line in figure_lines(figures):
            if line:
                err.print(line, markup=False, highlight=False, soft_wrap=True)
        if plot is not None:
            from asrshrink.report import plot_amnet_trace

            plot_amnet_trace(figures, plot)
            err.print(f"wrote {plot} (the frame-by-frame trace of {figures['trace']['utterance']})", markup=False,
                      highlight=False)
    if json_out:
        payload = result.to_json()
        payload.update(model=str(info.path), data=str(dataset.source), dropped=dataset.dropped)
        if figures is not None:
            payload["amnet"] = figures
        if groups is not None:
            payload["by"] = groups
        print(json.dumps(payload))


@app.command("info")
@handle_errors
def info_command(
    model: ModelArg = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Family, parameters and bytes per component, and FLOPs.

    FLOPs count 2 per multiply-add (gate and linear matmuls, attention products, convolutions): the encoder's
    per encoder output frame, also per encoder layer, the prediction network's per label step, the joint's per
    evaluation. Attention's cost grows with the utterance; Conformers count it at a stated length (10 s).

    Example: asrshrink info model.nemo --json
    """
    from asrshrink.models.checkpoint import load_model
    from asrshrink.models.describe import describe

    net, info = load_model(model)
    summary = describe(net, info)
    if json_out:
        print(json.dumps(summary))
        return
    # Paths go on a line of their own: a table title would wrap them mid-name on a narrow terminal.
    out.print(f"{info.path} ({summary['family']}, {info.kind})", soft_wrap=True, markup=False, highlight=False)
    table = Table()
    for column in ("component", "parameters", "MB (float32)"):
        table.add_column(column, justify="right" if column != "component" else "left")
    for name, params in summary["params_by_component"].items():
        table.add_row(name, f"{params:,}", f"{summary['bytes_by_component'][name] / 1e6:.2f}")
    table.add_row("total", f"{summary['params']:,}", f"{summary['bytes'] / 1e6:.2f}", style="bold")
    out.print(table)
    flops = summary["flops"]
    frame_ms = summary["encoder_frame_seconds"] * 1000
    layers = Table(title="encoder layers")
    for column in ("layer", "parameters", "MFLOPs per frame"):
        layers.add_column(column, justify="left" if column == "layer" else "right")
    for layer in summary["encoder_layers"]:
        layers.add_row(layer["name"], f"{layer['params']:,}", f"{layer['flops_per_frame'] / 1e6:.3f}")
    out.print(layers)
    if summary.get("sharing"):
        sharing = summary["sharing"]
        shared = Table(title=f"shared weights: {sharing['virtual_layers']} virtual layers of the "
                             f"{sharing['component']}, {summary['params']:,} physical parameters "
                             f"({sharing['virtual_params']:,} virtual)")
        for column in ("module", "physical", "index of each virtual layer"):
            shared.add_column(column)
        for kind, indices in sharing["indices"].items():
            shared.add_row(kind, str(sharing["physical"][kind]), ",".join(map(str, indices)))
        out.print(shared)
        if sharing["unshare"]:
            out.print(f"per layer: {', '.join(sharing['unshare'])}", markup=False, highlight=False)
    if summary.get("amnet"):
        _print_amnet(summary["amnet"], summary["flops"]["encoder_per_frame"])
    elif summary.get("structure"):
        ranks = Table(title="compressed layers")
        for column in ("layer", "input side", "recurrent side"):
            ranks.add_column(column)
        for name, spec in summary["structure"].items():
            if spec["type"] == "projected_lstm":  # an nn.LSTM(proj_size=r), or one reading a projection
                four_h, r = 4 * spec["hidden_size"], spec["proj_size"] or spec["hidden_size"]
                texts = [f"{four_h}x{spec['input_size']}",
                         f"{four_h}x{r}, projection {r}x{spec['hidden_size']}" if spec["proj_size"] else
                         f"{four_h}x{r}"]
            elif spec["type"] == "projected_input_linear":
                texts = [f"{spec['out']}x{spec['in']} (reads a projection)", ""]
            else:
                sides = [spec["ih"], spec["hh"]] if "ih" in spec else [spec, None]
                texts = [_side_text(side) for side in sides]
            ranks.add_row(name, *texts)
        out.print(ranks)
    if summary["sparse_bytes"] != summary["bytes"]:
        out.print(f"sparse storage (each pruned matrix as a bit mask + float32 non-zeros): "
                  f"{summary['nonzero_params']:,} non-zero parameters, {summary['sparse_bytes'] / 1e6:.2f} MB")
    out.print(f"FLOPs: encoder {flops['encoder_per_frame'] / 1e6:.2f} M per {frame_ms:.0f} ms frame "
              f"({flops['encoder_per_frame'] / summary['encoder_frame_seconds'] / 1e9:.2f} GFLOP per audio second), "
              f"prediction {flops['prediction_per_label'] / 1e6:.2f} M per label, "
              f"joint {flops['joint_per_evaluation'] / 1e6:.3f} M per evaluation")
    if summary["flops_frames"]:
        out.print(f"(attention's sequence-length dependent FLOPs counted at {summary['flops_frames']} encoder frames, "
                  f"{summary['flops_frames'] * summary['encoder_frame_seconds']:.0f} s of audio)")


def _print_amnet(amnet: dict, worst: int) -> None:
    """An AmNet's branches and arbitrator (``describe``'s ``amnet`` section)."""
    table = Table(title="AmNet branches (slow / fast)")
    for column in ("layer", "kind", "input side", "recurrent side"):
        table.add_column(column)
    for row in amnet["layers"]:
        def text(side: dict) -> str:
            shape = f"{side['shape'][0]}x{side['shape'][1]}"
            if "ranks" in side:
                return f"{shape} rank {side['ranks'][0]} / {side['ranks'][1]}"
            return f"{shape} sparsity {side['sparsity'][0]:.1%} / {side['sparsity'][1]:.1%}"

        table.add_row(row["name"], row["kind"], text(row["ih"]), text(row["hh"]))
    out.print(table)
    a = amnet["arbitrator"]
    slow, fast = amnet["branch_flops_per_frame"]
    out.print(f"arbitrator: LSTM {a['num_layers']} x {a['hidden_size']} on {a['input_size']} inputs"
              + (" + its previous decision" if a["feedback"] else "") + f", {a['params']:,} parameters, "
              f"{a['flops_per_frame'] / 1e6:.3f} MFLOPs per decision")
    out.print(f"encoder FLOPs per frame by branch (arbitrator included): slow {(slow + a['flops_per_frame']) / 1e6:.2f}"
              f" M, fast {(fast + a['flops_per_frame']) / 1e6:.2f} M (the FLOPs line below counts the slow branch)")


def _side_text(side: dict | None) -> str:
    if side is None:
        return ""
    if side["type"] == "lowrank":
        return f"{side['out']}x{side['in']} rank {side['rank']}" + (" per gate" if side["groups"] > 1 else "")
    if side["type"] == "residual":
        return f"{_side_text(side['base'])} + per-layer residual rank {side['rank']}"
    if side["type"] == "basis":
        return f"{side['out']}x{side['in']} rank {side['rank']} shared basis"
    if side["type"] == "sparse":
        return f"{side['out']}x{side['in']} sparsity {1 - side['nonzeros'] / (side['out'] * side['in']):.1%}"
    return f"{side['out']}x{side['in']} dense"


@app.command("dump")
@handle_errors
def dump_command(
    model: Annotated[Path, typer.Argument(help="Checkpoint, asrshrink model or output directory.")],
    audio: Annotated[list[Path], typer.Argument(help="Audio files (any format soundfile reads).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The .npz file to write.")],
) -> None:
    """Write features, encoder output and greedy tokens of audio files to an .npz, to check a checkpoint
    against another inference stack. Keys: {stem}.features (frames x features), {stem}.encoder
    (encoder frames x dim), {stem}.tokens (greedy token ids).

    Example: asrshrink dump rnnt.pt a.wav b.flac -o ref.npz
    """
    import numpy as np

    from asrshrink.evaluate.transcribe import dump
    from asrshrink.io import atomic_write
    from asrshrink.models.checkpoint import load_model

    net, _ = load_model(model)
    arrays = dump(net, audio)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(output, write)
    err.print(f"wrote {output} ({len(audio)} file(s), {len(arrays)} arrays)")


def main() -> None:
    app()


from asrshrink.cli import compress  # noqa: E402,F401  (registers svd, psvd and prune on the app)
from asrshrink.cli import export  # noqa: E402,F401  (registers export on the app)
from asrshrink.cli import report  # noqa: E402,F401  (registers report and gate)


if __name__ == "__main__":
    main()
