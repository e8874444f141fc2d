"""Options of every compression method as frozen dataclasses, with a JSON round trip into outputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from asrshrink.errors import AsrshrinkError


@dataclass(frozen=True)
class SvdConfig:
    """Truncated SVD: ``threshold`` keeps ceil(T * min(m, n)) singular values, unless ``rank`` is given."""

    threshold: float | None = 0.2
    rank: int | None = None
    mode: str = "stacked"                      # "stacked" (4 gates as one matrix) or "rollout" (per gate)
    components: tuple[str, ...] = ("encoder",)
    data_aware: bool = False                   # truncate W S (S: Cholesky factor of the inputs' second moment)
    compression_ratio: float | None = None     # per-layer ranks under a global budget instead of a threshold
    target_params: int | None = None

    @property
    def budgeted(self) -> bool:
        return self.compression_ratio is not None or self.target_params is not None

    def check(self) -> None:
        if self.rank is None and (self.threshold is None or not 0 < self.threshold <= 1):
            raise AsrshrinkError(f"--rank-threshold must be in (0, 1], got {self.threshold}")
        if self.rank is not None and self.rank < 1:
            raise AsrshrinkError(f"--rank must be at least 1, got {self.rank}")


PRUNE_METHODS = ("magnitude", "sparsegpt", "wanda")


@dataclass(frozen=True)
class PruneConfig:
    """Unstructured pruning: each chosen matrix to ``sparsity`` (``global_threshold``: one magnitude threshold
    across all chosen matrices sets each matrix's share), weights picked by ``method``. ``block_size`` and
    ``damping`` (times the mean diagonal of the inputs' second moment) are SparseGPT's."""

    sparsity: float = 0.5
    method: str = "magnitude"                  # "magnitude", or calibrated: "sparsegpt", "wanda"
    components: tuple[str, ...] = ("encoder",)
    global_threshold: bool = False
    block_size: int = 128
    damping: float = 0.01

    @property
    def calibrated(self) -> bool:
        return self.method != "magnitude"

    def check(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise AsrshrinkError(f"--sparsity must be in [0, 1) (the fraction of weights set to zero), "
                                 f"got {self.sparsity}")
        if self.method not in PRUNE_METHODS:
            raise AsrshrinkError(f"--method must be one of {', '.join(PRUNE_METHODS)}, got {self.method!r}")
        if self.block_size < 1:
            raise AsrshrinkError(f"the SparseGPT block size must be at least 1, got {self.block_size}")
        if not self.damping > 0:
            raise AsrshrinkError(f"the SparseGPT damping must be positive, got {self.damping}")


@dataclass(frozen=True)
class CalibConfig:
    """Calibration utterances: ``path`` None means the bundled calibration sample."""

    path: str | None = None
    num_utterances: int = 400
    seed: int = 0
    max_duration: float | None = 15.0
    batch_size: int = 32

    def check(self) -> None:
        if self.num_utterances < 1:
            raise AsrshrinkError(f"--num-utterances must be at least 1, got {self.num_utterances}")


def to_json(config: Any) -> dict[str, Any]:
    data = asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def from_json(cls: type, data: dict[str, Any]) -> Any:
    kwargs = {}
    for f in fields(cls):
        if f.name in data:
            value = data[f.name]
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)
