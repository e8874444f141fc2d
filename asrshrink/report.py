"""Run records of compressing commands: ``report.json`` (versioned schema) and ``report.md``; reading them back
for comparison tables and plots.

Schema ``asrshrink.report/1`` (every key always present; null where not measured):
  schema, command, asrshrink_version, created (UTC ISO 8601), seconds (wall time of the whole run),
  source {path, sha256, family}, output {path, sha256},
  options {...the command's options...},
  before / after {params, bytes, params_by_component, bytes_by_component, flops,
                  nonzero_params, nonzero_params_by_component, sparse_bytes, sparse_bytes_by_component}:
    bytes count every parameter as float32; nonzero_params leave out the zeros of pruned matrices and
    sparse_bytes store each pruned matrix as a bit mask (ceil(n / 8) bytes) plus its float32 non-zeros, the
    storage of eq. 13 in Prabhavalkar et al., "Compression of end-to-end models" (equal to params / bytes for
    a model without pruned matrices),
  compression_ratio {model, by_component}: parameters before / after,
    and storage {model, by_component}: sparse_bytes before / after,
  layers [one row per weight the method considered: layer, side, shape, groups, rank, status; rows of
          ``prune`` also carry target_sparsity, sparsity (achieved), nonzeros, bytes_dense, bytes_sparse
          (null for matrices not pruned), error and error_magnitude (relative output error of the matrix on its
          calibration inputs after this method and after magnitude pruning to the same sparsity; null without
          calibration), layer_error (relative error of the pruned LSTM layer's output against the unpruned
          model's on the calibration data, its inputs from the already-pruned layers)],
  post_training [one row per refitted layer and iteration: iteration, layer, ranks, rows, error_before,
                 error_after (relative squared error of the layer's output against the uncompressed model's on
                 the calibration data, measured by running the layer), step (0 to 1: how far towards the
                 least-squares fit the layer moved), seconds] (empty if none),
  eval {data, num_utterances, num_words, before {wer, cer}, after {wer, cer}} or null;
  and, only for a method that reports its own figures, figures {...}: ``share`` gives plan {component,
  virtual_layers, physical {kind: N}, indices {kind: [...]}, unshare}, calibration_encoder_error (relative
  error of the encoder output against the original's on the calibration data) and, with a budget, candidates
  [plan, params, error, status, chosen]; its layers rows also carry module, part, members, init, error (the
  group's relative output error on its members' calibration inputs) and residual_rank.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any

import asrshrink
from asrshrink.errors import AsrshrinkError
from asrshrink.io import atomic_write, sha256_file, write_json_atomic, write_text_atomic

SCHEMA = "asrshrink.report/1"


def build_report(command: str, *, source: dict, output: Path, options: dict, before: dict, after: dict,
                 layers: list[dict], seconds: float, post_training: list[dict] | None = None,
                 evaluation: dict | None = None, figures: dict | None = None) -> dict[str, Any]:
    def sizes(d: dict) -> dict:
        return {k: d[k] for k in ("params", "bytes", "params_by_component", "bytes_by_component", "flops",
                                  "nonzero_params", "nonzero_params_by_component", "sparse_bytes",
                                  "sparse_bytes_by_component")}

    ratio_by = {name: before["params_by_component"][name] / max(after["params_by_component"][name], 1)
                for name in before["params_by_component"]}
    storage_by = {name: before["sparse_bytes_by_component"][name] / max(after["sparse_bytes_by_component"][name], 1)
                  for name in before["sparse_bytes_by_component"]}
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
        "compression_ratio": {"model": before["params"] / max(after["params"], 1), "by_component": ratio_by,
                              "storage": {"model": before["sparse_bytes"] / max(after["sparse_bytes"], 1),
                                          "by_component": storage_by}},
        "layers": layers,
        "post_training": post_training or [],
        "eval": evaluation,
        **({"figures": figures} if figures else {}),
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
    lines += _storage_lines(report)
    fb, fa = b["flops"]["encoder_per_frame"], a["flops"]["encoder_per_frame"]
    lines += ["", f"Encoder FLOPs per frame: {fb / 1e6:.2f} M -> {fa / 1e6:.2f} M ({fb / max(fa, 1):.2f}x fewer).",
              ""]
    if report["eval"]:
        e = report["eval"]
        lines += [f"WER on `{e['data']}` ({e['num_utterances']} utterances, {e['num_words']} words): "
                  f"{e['before']['wer']:.2f} % before, {e['after']['wer']:.2f} % after "
                  f"(CER {e['before']['cer']:.2f} % -> {e['after']['cer']:.2f} %).", ""]
        if isinstance(e.get("figures"), dict) and "branch_ratios" in e["figures"]:
            from asrshrink.evaluate.amnet import figure_lines

            lines += figure_lines(e["figures"])
    lines += _sharing_lines(report)
    if report["layers"] and "sparsity" in report["layers"][0]:
        lines += _pruned_layer_lines(report["layers"])
    elif report["layers"]:
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


def _sharing_lines(report: dict) -> list[str]:
    """The sharing plan (virtual layers, physical modules per kind) and the candidate plans a budget tried."""
    figures = report.get("figures") or {}
    plan = figures.get("plan")
    if not plan:
        return []
    physical = ", ".join(f"{kind} {n}" for kind, n in plan["physical"].items())
    lines = [f"Sharing: {plan['virtual_layers']} virtual layers of the {plan['component']}; physical modules "
             f"{physical}" + (f"; unshared: {', '.join(plan['unshare'])}" if plan["unshare"] else "") + ".", ""]
    if "calibration_encoder_error" in figures:
        lines += [f"Relative encoder output error on the calibration data: "
                  f"{figures['calibration_encoder_error']:.4f}.", ""]
    if figures.get("candidates"):
        lines += ["| candidate plan | params | calibration error | status |", "| --- | ---: | ---: | --- |"]
        for row in figures["candidates"]:
            lines.append(f"| {row['plan']}{' (chosen)' if row.get('chosen') else ''} | {_cell(row['params'])} | "
                         f"{'-' if row['error'] is None else format(row['error'], '.4f')} | {row['status']} |")
        lines.append("")
    return lines


def _storage_lines(report: dict) -> list[str]:
    """The sparse-storage table, when a model before or after has pruned matrices."""
    b, a = report["before"], report["after"]
    if "sparse_bytes" not in a or (a["sparse_bytes"] == a["bytes"] and b["sparse_bytes"] == b["bytes"]):
        return []
    storage = report["compression_ratio"]["storage"]
    lines = ["", "Sparse storage (each pruned matrix as a bit mask plus its float32 non-zeros, eq. 13 of "
             "\"Compression of end-to-end models\"; other parameters dense):", "",
             "| component | non-zero params after | MB dense after | MB sparse before | MB sparse after | ratio |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    rows = [(name, a["nonzero_params_by_component"][name], a["bytes_by_component"][name],
             b["sparse_bytes_by_component"][name], a["sparse_bytes_by_component"][name],
             storage["by_component"][name]) for name in a["sparse_bytes_by_component"]]
    rows.append(("**total**", a["nonzero_params"], a["bytes"], b["sparse_bytes"], a["sparse_bytes"],
                 storage["model"]))
    for name, nonzero, dense, before, after, ratio in rows:
        lines.append(f"| {name} | {nonzero:,} | {dense / 1e6:.2f} | {before / 1e6:.2f} | {after / 1e6:.2f} | "
                     f"{ratio:.2f} |")
    return lines


def _pruned_layer_lines(layers: list[dict]) -> list[str]:
    lines = ["Relative output errors on the calibration inputs: the matrix's (after magnitude pruning to the same "
             "sparsity in brackets) and the whole layer's.", "",
             "| layer | side | shape | sparsity | non-zeros | KB dense | KB sparse | error (magnitude) | layer error "
             "| status |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in layers:
        error = "" if row["error"] is None else f"{row['error']:.4f} ({row['error_magnitude']:.4f})"
        layer_error = "" if row["layer_error"] is None else f"{row['layer_error']:.4f}"
        lines.append(f"| {row['layer']} | {row['side']} | {row['shape'][0]}x{row['shape'][1]} | "
                     f"{row['sparsity']:.3f} | {row['nonzeros']:,} | {_kb(row['bytes_dense'])} | "
                     f"{_kb(row['bytes_sparse'])} | {error} | {layer_error} | {row['status']} |")
    return lines + [""]


def _kb(value: int | None) -> str:
    return "" if value is None else f"{value / 1e3:.1f}"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return "" if value is None else str(value)


def write_report(out_dir: Path, report: dict) -> None:
    write_json_atomic(out_dir / "report.json", report)
    write_text_atomic(out_dir / "report.md", render_markdown(report))


# Reading reports back: comparison rows and the WER-against-size plot of ``asrshrink report``.

#: What ``report`` and ``gate`` read from a report: (dotted key, kind, required). kind: "count" (a
#: non-negative integer), "number" (finite, non-negative), "str", "dict", "eval" (null or an object).
FIELDS = (
    ("command", "str", True), ("options", "dict", False), ("source", "dict", False),
    ("before.params", "count", True), ("before.bytes", "number", True), ("before.sparse_bytes", "number", False),
    ("before.flops.encoder_per_frame", "number", True),
    ("after.params", "count", True), ("after.bytes", "number", True), ("after.sparse_bytes", "number", False),
    ("after.flops.encoder_per_frame", "number", True),
    ("compression_ratio.model", "number", True), ("eval", "eval", True),
)
EVAL_FIELDS = (("eval.before.wer", "number", True), ("eval.after.wer", "number", True),
               ("eval.data", "str", False))
_MISSING = object()


def check_report(report: Any, file: Path) -> None:
    """Refuse a report that ``report`` / ``gate`` cannot read, naming the first bad key and what it should be."""
    redo = "re-run the svd/psvd/prune command that wrote it"
    schema = report.get("schema") if isinstance(report, dict) else None
    if schema != SCHEMA:
        newer = isinstance(schema, str) and schema.startswith("asrshrink.report/")
        raise AsrshrinkError(f"{file}: schema {schema!r}, expected {SCHEMA!r}; "
                             + ("upgrade asrshrink to read it" if newer else
                                "pass the report.json that asrshrink svd, psvd or prune wrote"))
    fields = FIELDS + (EVAL_FIELDS if isinstance(report.get("eval"), dict) else ())
    for key, kind, required in fields:
        value = _lookup(report, key)
        if value is _MISSING:
            if required:
                raise AsrshrinkError(f"{file}: {key} is missing; {redo}")
            continue
        ok = {"count": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
              "number": lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                   and v >= 0),
              "str": lambda v: isinstance(v, str), "dict": lambda v: isinstance(v, dict),
              "eval": lambda v: v is None or isinstance(v, dict)}[kind](value)
        if not ok:
            want = {"count": "a non-negative integer", "number": "a finite non-negative number", "str": "a string",
                    "dict": "an object", "eval": "null or an object with before.wer and after.wer"}[kind]
            raise AsrshrinkError(f"{file}: {key} is {json.dumps(value)[:60]}, expected {want}; {redo}")


def load_report(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """Read and check ``report.json`` (``path`` is the file or the output directory that holds it).

    Returns the file's path and the report; raises AsrshrinkError naming the file and the fix.
    """
    path = Path(path)
    file = path / "report.json" if path.is_dir() else path
    redo = "re-run the svd/psvd/prune command that wrote it"
    if not file.is_file():
        raise AsrshrinkError(f"{file}: no such file; pass an output directory that svd or psvd wrote, or its "
                             f"report.json")
    try:
        with open(file, "rb") as f:
            data = f.read(64 << 20)  # a report is a few KB; a huge file is not one
        report = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise AsrshrinkError(f"{file}: not valid JSON ({_one_line(exc)}); {redo}") from None
    check_report(report, file)
    return file, report


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]


def _lookup(report: dict, key: str) -> Any:
    """The value at a dotted key, or _MISSING when a level is absent or not an object."""
    value: Any = report
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def options_summary(options: dict) -> str:
    """The options that decide the result, in a few words (rank choice, mode, components, PSVD passes;
    sparsity and method for prune)."""
    if options.get("sparsity") is not None:
        parts = [f"sparsity {options['sparsity']:g} {options.get('method', '?')}"]
        if options.get("global_threshold"):
            parts.append("global")
        if list(options.get("components") or ["encoder"]) != ["encoder"]:
            parts.append("+".join(options["components"]))
        return ", ".join(parts)
    if options.get("rank") is not None:
        parts = [f"rank {options['rank']}"]
    elif options.get("compression_ratio") is not None:
        parts = [f"ratio {options['compression_ratio']:g}x"]
    elif options.get("target_params") is not None:
        parts = [f"target {options['target_params']:,} params"]
    else:
        parts = [f"threshold {options.get('threshold', '?')}"]
    if options.get("mode", "stacked") != "stacked":
        parts.append(str(options["mode"]))
    if options.get("structure", "factors") != "factors":
        parts.append(str(options["structure"]))
    if options.get("data_aware"):
        parts.append("data-aware")
    if list(options.get("components") or ["encoder"]) != ["encoder"]:
        parts.append("+".join(options["components"]))
    if isinstance(options.get("psvd"), dict):
        psvd = options["psvd"]
        parts.append(f"{psvd.get('iterations', '?')} iterations ({psvd.get('variant', '?')})"
                     + (f", {psvd['refits']} refits" if psvd.get("refits", 1) != 1 else ""))
    return ", ".join(parts)


def storage_bytes(sizes: dict) -> int:
    """Bytes to store a model: float32 parameters, pruned matrices as bit mask + non-zeros (``sparse_bytes``)."""
    return sizes.get("sparse_bytes", sizes["bytes"])


def comparison_row(name: str, report: dict) -> dict[str, Any]:
    """One row of ``asrshrink report``: sizes after (bytes: storage, see storage_bytes), ratio, FLOPs, WER (% or
    None)."""
    e = report["eval"]
    before, after = report["before"], report["after"]
    return {"name": name, "command": report["command"], "options": options_summary(report.get("options") or {}),
            "params": after["params"], "bytes": storage_bytes(after),
            "params_before": before["params"], "bytes_before": storage_bytes(before),
            "compression_ratio": storage_bytes(before) / max(storage_bytes(after), 1),
            "encoder_flops_per_frame": report["after"]["flops"]["encoder_per_frame"],
            "wer_before": e["before"]["wer"] if e else None, "wer_after": e["after"]["wer"] if e else None,
            "eval_data": e.get("data") if e else None, "source_sha256": (report.get("source") or {}).get("sha256")}


def render_comparison_markdown(rows: list[dict]) -> str:
    lines = ["| output | command | options | params | MB | ratio | encoder MFLOPs/frame | WER before | WER after |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['command']} | {r['options']} | {r['params']:,} | {r['bytes'] / 1e6:.2f} | "
                     f"{r['compression_ratio']:.2f} | {r['encoder_flops_per_frame'] / 1e6:.2f} | "
                     f"{_wer(r['wer_before'])} | {_wer(r['wer_after'])} |")
    return "\n".join(lines) + "\n"


def _wer(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def check_png(path: str | Path, option: str) -> None:
    """Refuse a plot file name that is not a .png, naming the option that gave it."""
    if Path(path).suffix.lower() != ".png":
        raise AsrshrinkError(f"{path}: {option} writes a PNG; give a file name ending in .png")


def plot_wer_size(rows: list[dict], path: str | Path) -> list[str]:
    """Write a PNG of WER after compression against model size (MB), one labelled point per row, and each
    distinct source model (before compression) as a square. Returns the names of rows left out (no eval)."""
    check_png(path, "--plot")
    shown = [r for r in rows if r["wer_after"] is not None]
    if not shown:
        raise AsrshrinkError("no report carries WER, nothing to plot; run svd/psvd with --eval PATH")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise AsrshrinkError("--plot needs matplotlib: pip install 'asrshrink[plot]'") from None
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    sources = {r["source_sha256"]: r for r in shown}
    ax.scatter([r["bytes_before"] / 1e6 for r in sources.values()],
               [r["wer_before"] for r in sources.values()], marker="s", color="0.4", label="before compression")
    ax.scatter([r["bytes"] / 1e6 for r in shown], [r["wer_after"] for r in shown], color="C0", label="compressed")
    for r in shown:
        ax.annotate(r["name"], (r["bytes"] / 1e6, r["wer_after"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set(xlabel="model size (MB, float32 parameters)", ylabel="WER (%)", title="WER against model size")
    ax.grid(alpha=0.3)
    ax.legend()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return [r["name"] for r in rows if r["wer_after"] is None]


def plot_amnet_trace(figures: dict, path: str | Path, option: str = "--plot") -> None:
    """Write a PNG of an AmNet's frame-by-frame trace on one utterance (``amnet_figures``' ``trace``: the
    longest evaluated): the branch chosen at each decision frame, and the modelled backlog (as delay, ms) of
    the AmNet against the dense encoder's at the same device speed mu."""
    trace = figures.get("trace") if isinstance(figures, dict) else None
    if not isinstance(trace, dict) or not trace.get("branch"):
        raise AsrshrinkError("no AmNet trace to plot: evaluate an AmNet model (amnet-finetune --eval, or eval)")
    n = len(trace["branch"])

    def numbers(value, ok=lambda v: True) -> bool:
        return isinstance(value, list) and len(value) == n and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and ok(v) for v in value)

    rates_ok = all(isinstance(figures.get(k), (int, float)) and math.isfinite(figures[k]) and figures[k] > 0
                   for k in ("mu", "rho"))
    if not (numbers(trace["branch"], lambda v: v in (0, 1)) and numbers(trace.get("backlog_ms"))
            and numbers(trace.get("dense_backlog_ms")) and rates_ok
            and isinstance(trace.get("duration"), (int, float)) and isinstance(trace.get("utterance"), str)):
        raise AsrshrinkError("the AmNet trace is malformed (branch 0/1 per frame, two backlog series of the same "
                             "length, positive mu and rho); evaluate the model again to rewrite it")
    check_png(path, option)
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise AsrshrinkError("plotting needs matplotlib: pip install 'asrshrink[plot]'") from None
    rho = float(figures["rho"])
    seconds = [t / rho for t in range(len(trace["branch"]))]
    fig = Figure(figsize=(7.2, 4.8), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(1, 2))
    top.step(seconds, trace["branch"], where="post", color="C0")
    top.set(yticks=[0, 1], yticklabels=["slow", "fast"], ylim=(-0.2, 1.2), ylabel="branch",
            title=f"AmNet on {trace['utterance']} ({trace['duration']:.1f} s): "
                  f"{sum(trace['branch']) / len(trace['branch']):.0%} of frames fast")
    bottom.plot(seconds, trace["dense_backlog_ms"], color="0.4", label="dense encoder")
    bottom.plot(seconds, trace["backlog_ms"], color="C1", label="AmNet")
    bottom.set(xlabel="audio time (s)", ylabel="modelled backlog (ms of delay)",
               title=f"device speed mu = {figures['mu'] / 1e6:.1f} MFLOP/s")
    bottom.grid(alpha=0.3)
    bottom.legend()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
