"""The ``report`` and ``gate`` commands: read the report.json of compressed outputs, compare them, enforce bounds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from asrshrink.cli.main import app, err, handle_errors, out


@app.command("report")
@handle_errors
def report_command(
    outputs: Annotated[list[Path], typer.Argument(help="Output directories of svd/psvd, or their report.json.",
                                                  show_default=False)],
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of WER against model size (needs matplotlib: "
                                                      "pip install 'asrshrink[plot]').", show_default=False)] = None,
    amnet_plot: Annotated[Optional[Path], typer.Option(
        help="One amnet-finetune output run with --eval: write a PNG of its branch decisions and modelled backlog "
             "over the longest evaluated utterance (needs matplotlib).", show_default=False)] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table instead.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the rows as one JSON list on stdout.")] = False,
) -> None:
    """Compare compressed outputs: command, options, parameters and MB after, compression ratio, encoder FLOPs
    per frame and, where the run had --eval, WER before and after.

    Example: asrshrink report out/svd out/psvd --plot wer-size.png

    Example: asrshrink report amnet/ --amnet-plot amnet-trace.png
    """
    from asrshrink.errors import AsrshrinkError
    from asrshrink.report import (check_png, comparison_row, load_report, plot_amnet_trace, plot_wer_size,
                                  render_comparison_markdown)

    if markdown and json_out:
        raise AsrshrinkError("give --markdown or --json, not both")
    if amnet_plot is not None and len(outputs) != 1:
        raise AsrshrinkError(f"--amnet-plot draws one AmNet output; got {len(outputs)}")
    if amnet_plot is not None:
        check_png(amnet_plot, "--amnet-plot")
    reports = [load_report(path) for path in outputs]
    rows = [comparison_row(str(path), report) for path, (_, report) in zip(outputs, reports)]
    if amnet_plot is not None:
        file, report = reports[0]
        figures = (report.get("eval") or {}).get("figures")
        if not isinstance(figures, dict) or not figures.get("trace"):
            raise AsrshrinkError(f"{file}: no AmNet trace in this report; it needs an amnet-finetune run with "
                                 "--eval (or draw one with: asrshrink eval AMNET --plot FILE)")
        plot_amnet_trace(figures, amnet_plot, "--amnet-plot")
        err.print(f"wrote {amnet_plot}", markup=False, highlight=False)
    if plot is not None:
        left_out = plot_wer_size(rows, plot)
        err.print(f"wrote {plot}" + (f" (no WER, not plotted: {', '.join(left_out)})" if left_out else ""),
                  markup=False, highlight=False)
    if json_out:
        print(json.dumps(rows))
    elif markdown:
        print(render_comparison_markdown(rows), end="")
    else:
        cells = [[r["name"], f"{r['command']}: {r['options']}", f"{r['params']:,}", f"{r['bytes'] / 1e6:.2f}",
                  f"{r['compression_ratio']:.2f}", f"{r['encoder_flops_per_frame'] / 1e6:.2f}",
                  *("-" if w is None else f"{w:.2f}" for w in (r["wer_before"], r["wer_after"]))] for r in rows]
        table = Table(title="asrshrink outputs (MFLOPs: encoder, per frame; WER in %)")
        for i, column in enumerate(("output", "method", "params", "MB", "ratio", "MFLOPs", "WER before",
                                    "WER after")):
            table.add_column(column, overflow="fold", justify="left" if i < 2 else "right",
                             min_width=max(len(row[i]) for row in cells) if i >= 2 else 8)
        for row in cells:
            table.add_row(*row)
        out.print(table)


@app.command("gate")
@handle_errors
def gate_command(
    report: Annotated[Path, typer.Argument(help="An output directory of svd/psvd, or its report.json.",
                                           show_default=False)],
    max_size_mb: Annotated[Optional[float], typer.Option(
        help="Storage size after compression (float32 parameters; pruned matrices as bit mask + non-zeros), "
             "MB of 10^6 bytes.", show_default=False)] = None,
    max_params: Annotated[Optional[int], typer.Option(help="Parameters after compression.",
                                                      show_default=False)] = None,
    max_wer: Annotated[Optional[float], typer.Option(help="WER after compression, percent.",
                                                     show_default=False)] = None,
    max_wer_increase: Annotated[Optional[float], typer.Option(
        help="WER after minus WER before, in absolute percentage points.", show_default=False)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print every bound with its measured value and "
                                                          "verdict as one JSON object on stdout.")] = False,
) -> None:
    """Check a compressed output against bounds, for CI: one line per bound (measured against the bound).

    Exit codes: 0 when every bound holds; 1 only when a bound fails; 2 on any input or usage error (no bound
    given, a bound that is not a finite number, a missing or malformed report.json: one line naming the file
    and the key); 3 on an internal error. A WER bound on a report without WER (a run without --eval) fails.

    Example: asrshrink gate out/psvd --max-size-mb 40 --max-wer-increase 0.5
    """
    from asrshrink.gate import check_bounds
    from asrshrink.report import load_report

    file, data = load_report(report)
    checks = check_bounds(data, max_size_mb=max_size_mb, max_params=max_params, max_wer=max_wer,
                          max_wer_increase=max_wer_increase)
    for check in checks:
        err.print(check.line(), markup=False, highlight=False, soft_wrap=True,
                  style=None if check.passed else "bold red")
    passed = all(c.passed for c in checks)
    if json_out:
        print(json.dumps({"report": str(file), "passed": passed, "bounds": [c.to_json() for c in checks]}))
    if not passed:
        raise typer.Exit(1)
