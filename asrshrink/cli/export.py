"""The ``export`` command: a model -> an ONNX export directory checked against PyTorch -> a summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from asrshrink.cli.main import BUNDLED_HELP, ModelArg, app, data_path, err, handle_errors
from asrshrink.export import DEFAULT_OPSET


@app.command("export")
@handle_errors
def export_command(
    model: ModelArg = None,
    out: Annotated[Path, typer.Option("-o", "--output", help="Output directory (encoder.onnx, decoder.onnx, "
                                                             "joiner.onnx, tokens.txt, export.json).")] = ...,
    int8: Annotated[bool, typer.Option("--int8", help="Also write onnxruntime dynamic-quantized copies "
                                                      "(encoder.int8.onnx, ...).")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset version.")] = DEFAULT_OPSET,
    data: Annotated[Optional[Path], typer.Option(
        "--data", help=f"Speech for the parity check (any eval --data layout, {BUNDLED_HELP}; 3 utterances); "
                       "default: bundled:test.", show_default=False, parser=data_path)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print export.json as one JSON object on stdout.")] = False,
) -> None:
    """Export as ONNX the way deployment runtimes split a transducer: encoder.onnx (features, feature_lengths ->
    encoder_out, encoder_out_lens), decoder.onnx (targets, h, c -> decoder_out, next_h, next_c), joiner.onnx
    (encoder_out, decoder_out -> logits), tokens.txt and export.json. Featurization is not in the graph: the
    encoder takes asrshrink's features (settings in the metadata). Factorised layers stay factorised.

    Every part is checked against PyTorch on random inputs and on real speech (max abs difference at most 1e-4);
    otherwise the command fails and writes nothing. Decode an export with: asrshrink eval OUT --data PATH
    (OUT/encoder.int8.onnx picks the int8 copies).

    Example: asrshrink export svd-out/ -o svd-onnx/ --int8
    """
    from asrshrink.export.onnx import check_export_options, export_model, speech_sample
    from asrshrink.models.checkpoint import load_model
    from asrshrink.output import OutputLock

    check_export_options(out, opset)
    with OutputLock(out):  # one run per export folder; export_model stages and publishes it atomically
        net, info = load_model(model)
        speech = speech_sample(net, data)
        report = export_model(net, out, info=info, opset=opset, int8=int8, speech=speech,
                              log=lambda line: err.print(line, markup=False, highlight=False))
    err.print(f"{info.path} -> {out}", soft_wrap=True, markup=False, highlight=False)
    table = Table()
    for column in ("file", "MB", "max abs diff vs PyTorch"):
        table.add_column(column, justify="left" if column == "file" else "right")
    for name, size in report["files"].items():
        diffs = None
        if name.endswith(".onnx"):
            part, int8_copy = name.split(".")[0], name.endswith(".int8.onnx")
            diffs = (report["int8"] if int8_copy else report["parity"])["max_abs_diff"][part]
        table.add_row(name, f"{size / 1e6:.2f}", "" if diffs is None else f"{max(diffs.values()):.2g}")
    err.print(table)
    same = {True: "the same as", False: "DIFFERENT from", None: "not compared with"}[
        report["parity"]["greedy_tokens_equal"]]
    err.print(f"greedy tokens on {report['parity']['speech_utterances']} utterance(s): {same} PyTorch; "
              f"wrote {out} in {report['seconds']:.1f} s")
    if json_out:
        print(json.dumps(report))
