"""Run records of compressing commands: ``report.json`` (versioned schema) and ``report.md``.

Schema ``asrshrink.report/1`` (every key always present; null where not measured):
  schema, command, asrshrink_version, created (UTC ISO 8601), seconds (wall time of the whole run),
  source {path, sha256, family}, output {path, sha256},
  options {...the command's options...},
  before / after {params, bytes, params_by_component, bytes_by_component, flops},
  compression_ratio {model, by_component}: parameters before / after,
  layers [one row per weight the method considered: layer, side, shape, groups, rank, status],
  post_training [one row per refitted layer and iteration: iteration, layer, ranks, rows, error_before,
                 error_after (relative squared error of the layer's output against the uncompressed model's on
                 the calibration data, measured by running the layer), step (0 to 1: how far towards the
                 least-squares fit the layer moved), seconds] (empty if none),
  eval {data, num_utterances, num_words, before {wer, cer}, after {wer, cer}} or null.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import asrshrink
from asrshrink.io import sha256_file, write_json_atomic, write_text_atomic

SCHEMA = "asrshrink.report/1"


def build_report(command: str, *, source: dict, output: Path, options: dict, before: dict, after: dict,
                 layers: list[dict], seconds: float, post_training: list[dict] | None = None,
                 evaluation: dict | None = None) -> dict[str, Any]:
    def sizes(d: dict) -> dict:
        return {k: d[k] for k in ("params", "bytes", "params_by_component", "bytes_by_component", "flops")}

    ratio_by = {name: before["params_by_component"][name] / max(after["params_by_component"][name], 1)
                for name in before["params_by_component"]}
    return {
        "schema": SCHEMA,
        "command": command,
        "asrshrink_version": asrshrink.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": seconds,
        "source": source,
        "output": {"path": str(output), "sha256": sha256_file(output)},
        "options": options,
        "before": sizes(before),
        "after": sizes(after),
        "compression_ratio": {"model": before["params"] / max(after["params"], 1), "by_component": ratio_by},
        "layers": layers,
        "post_training": post_training or [],
        "eval": evaluation,
    }


def render_markdown(report: dict) -> str:
    b, a = report["before"], report["after"]
    lines = [f"# asrshrink {report['command']}", "",
             f"Source `{report['source']['path']}` (sha256 `{report['source']['sha256'][:16]}…`, "
             f"{report['source']['family']}), written by asrshrink {report['asrshrink_version']} on "
             f"{report['created']} in {report['seconds']:.1f} s.", "",
             "Options: " + ", ".join(f"`{k}={v}`" for k, v in report["options"].items()), "",
             "| component | params before | params after | ratio | MB before | MB after |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in b["params_by_component"]:
        lines.append(f"| {name} | {b['params_by_component'][name]:,} | {a['params_by_component'][name]:,} | "
                     f"{report['compression_ratio']['by_component'][name]:.2f} | "
                     f"{b['bytes_by_component'][name] / 1e6:.2f} | {a['bytes_by_component'][name] / 1e6:.2f} |")
    lines.append(f"| **total** | {b['params']:,} | {a['params']:,} | {report['compression_ratio']['model']:.2f} | "
                 f"{b['bytes'] / 1e6:.2f} | {a['bytes'] / 1e6:.2f} |")
    fb, fa = b["flops"]["encoder_per_frame"], a["flops"]["encoder_per_frame"]
    lines += ["", f"Encoder FLOPs per frame: {fb / 1e6:.2f} M -> {fa / 1e6:.2f} M ({fb / max(fa, 1):.2f}x fewer).",
              ""]
    if report["eval"]:
        e = report["eval"]
        lines += [f"WER on `{e['data']}` ({e['num_utterances']} utterances, {e['num_words']} words): "
                  f"{e['before']['wer']:.2f} % before, {e['after']['wer']:.2f} % after "
                  f"(CER {e['before']['cer']:.2f} % -> {e['after']['cer']:.2f} %).", ""]
    if report["layers"]:
        lines += ["| layer | side | shape | rank | status |", "| --- | --- | --- | ---: | --- |"]
        for row in report["layers"]:
            lines.append(f"| {row['layer']} | {row['side']} | {row['shape'][0]}x{row['shape'][1]}"
                         f"{' (per gate)' if row['groups'] > 1 else ''} | {_cell(row['rank'])} | {row['status']} |")
        lines.append("")
    if report["post_training"]:
        lines += ["Post-training (relative output error of each layer on the calibration data):", "",
                  "| iteration | layer | ranks | rows | error before | error after | step | seconds |",
                  "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for row in report["post_training"]:
            lines.append(f"| {row['iteration']} | {row['layer']} | {_cell(row['ranks'])} | {row['rows']} | "
                         f"{row['error_before']:.4f} | {row['error_after']:.4f} | {row['step']:g} | "
                         f"{row['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return "" if value is None else str(value)


def write_report(out_dir: Path, report: dict) -> None:
    write_json_atomic(out_dir / "report.json", report)
    write_text_atomic(out_dir / "report.md", render_markdown(report))
