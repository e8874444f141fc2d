"""Release gates on a compression report: bounds on size, parameters and WER that a CI job can enforce.

Size is the report's storage size after compression (float32 parameters, pruned matrices as bit mask +
non-zeros: ``asrshrink.report.storage_bytes``) in MB of 10^6 bytes; WER is in percent, and the WER
increase is ``eval.after.wer - eval.before.wer`` in absolute percentage points. A WER bound on a report
without ``eval`` fails, with the fix in its message: the bound cannot be shown to hold.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from asrshrink.errors import AsrshrinkError
from asrshrink.report import storage_bytes

NO_WER = "the report has no WER: run svd/psvd with --eval PATH"


@dataclass(frozen=True)
class Check:
    """One bound: ``measured`` is None when the report cannot tell (then ``passed`` is False)."""

    option: str                # the CLI option, e.g. "--max-size-mb"
    quantity: str              # what is measured, e.g. "size"
    limit: float
    measured: float | None
    unit: str
    passed: bool

    def line(self) -> str:
        if self.measured is None:
            return f"fail {self.option}: {NO_WER}"
        fmt = {"MB": "{:,.3f}", "params": "{:,.0f}"}.get(self.unit, "{:.2f}")
        value, limit = fmt.format(self.measured), fmt.format(self.limit)
        unit = "" if self.unit == "params" else f" {self.unit}"
        return (f"{'pass' if self.passed else 'fail'} {self.option}: {self.quantity} {value}{unit} "
                f"{'<=' if self.passed else '>'} {limit}{unit}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_bounds(report: dict, *, max_size_mb: float | None = None, max_params: int | None = None,
                 max_wer: float | None = None, max_wer_increase: float | None = None) -> list[Check]:
    """One Check per bound given; raises AsrshrinkError when none is given or a bound cannot be met by any model."""
    if all(b is None for b in (max_size_mb, max_params, max_wer, max_wer_increase)):
        raise AsrshrinkError("give at least one bound: --max-size-mb, --max-params, --max-wer or --max-wer-increase")
    for option, value in (("--max-size-mb", max_size_mb), ("--max-params", max_params), ("--max-wer", max_wer),
                          ("--max-wer-increase", max_wer_increase)):
        if value is not None and not math.isfinite(value):
            raise AsrshrinkError(f"{option} must be a finite number, got {value}")
        if value is not None and value < 0 and option != "--max-wer-increase":
            raise AsrshrinkError(f"{option} must not be negative, got {value}")
    e = report["eval"]
    measured = {
        "size": storage_bytes(report["after"]) / 1e6,
        "parameters": report["after"]["params"],
        "WER": e["after"]["wer"] if e else None,
        "WER increase": e["after"]["wer"] - e["before"]["wer"] if e else None,
    }
    checks = []
    for option, quantity, unit, limit in (("--max-size-mb", "size", "MB", max_size_mb),
                                          ("--max-params", "parameters", "params", max_params),
                                          ("--max-wer", "WER", "%", max_wer),
                                          ("--max-wer-increase", "WER increase", "points", max_wer_increase)):
        if limit is not None:
            value = measured[quantity]
            checks.append(Check(option, quantity, limit, value, unit, value is not None and value <= limit))
    return checks
