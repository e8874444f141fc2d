"""Options of every compression method as frozen dataclasses, with a JSON round trip into outputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

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
    targets: tuple[str, ...] = ()              # module name patterns to compress (empty: all of the components)
    ignore: tuple[str, ...] = ()               # module name patterns to leave as they are
    #: "factors": each matrix as low-rank factors U (V x); "projection": each LSTM layer as an LSTM with a
    #: projection of rank r (nn.LSTM(proj_size=r)), whose output m_t = P h_t feeds the recurrence and the
    #: modules that read the layer (eq. 11 of "Compression of end-to-end models").
    structure: str = "factors"

    @property
    def budgeted(self) -> bool:
        return self.compression_ratio is not None or self.target_params is not None

    def check(self) -> None:
        if self.rank is None and (self.threshold is None or not 0 < self.threshold <= 1):
            raise AsrshrinkError(f"--rank-threshold must be in (0, 1], got {self.threshold}")
        if self.rank is not None and self.rank < 1:
            raise AsrshrinkError(f"--rank must be at least 1, got {self.rank}")
        if self.mode not in SVD_MODES:
            raise AsrshrinkError(f"--mode must be one of {', '.join(SVD_MODES)}, got {self.mode!r}")
        if self.rank is not None and self.budgeted:
            raise AsrshrinkError("give either --rank or a budget (--compression-ratio / --target-params), not both")
        if self.compression_ratio is not None and self.target_params is not None:
            raise AsrshrinkError("give either --compression-ratio or --target-params, not both")
        if self.compression_ratio is not None and self.compression_ratio <= 1:
            raise AsrshrinkError(f"--compression-ratio must be above 1, got {self.compression_ratio}")
        if self.target_params is not None and self.target_params <= 0:
            raise AsrshrinkError(f"--target-params must be positive, got {self.target_params}")
        if self.structure not in SVD_STRUCTURES:
            raise AsrshrinkError(f"--structure must be one of {', '.join(SVD_STRUCTURES)}, got {self.structure!r}")
        if self.structure == "projection" and self.mode != "stacked":
            raise AsrshrinkError(f"--structure projection projects each LSTM layer's hidden state; --mode "
                                 f"{self.mode} factorises matrices: drop --mode")


#: SVD modes: factor groups per LSTM side (stacked: the 4 gates as one matrix; rollout: each gate on its own).
SVD_MODES = {"stacked": 1, "rollout": 4}
PSVD_VARIANTS = ("paper", "joint")
SVD_STRUCTURES = ("factors", "projection")


@dataclass(frozen=True)
class PsvdConfig:
    """PSVD post-training: ``iterations`` passes over the factorised matrices, first to last; ``variant``
    "paper" fits each LSTM side on its own, "joint" fits both sides to the summed pre-activation."""

    iterations: int = 3
    variant: str = "paper"
    ridge: float = 1e-7
    components: tuple[str, ...] = ("encoder",)
    #: Fits per layer and iteration. The recurrent fit's regressors are the hidden states of the layer's
    #: previous version; refitting with the refitted layer's own states approaches a fixed point (1: the paper).
    refits: int = 1

    def check(self) -> None:
        if self.iterations < 1:
            raise AsrshrinkError(f"--iterations must be at least 1, got {self.iterations}")
        if self.refits < 1:
            raise AsrshrinkError(f"--refits must be at least 1, got {self.refits}")
        if self.variant not in PSVD_VARIANTS:
            raise AsrshrinkError(f"--variant must be one of {', '.join(PSVD_VARIANTS)}, got {self.variant!r}")
        if not self.components:
            raise AsrshrinkError("psvd refits the encoder or prediction network: --components must include "
                                 "encoder or prediction")


@dataclass(frozen=True)
class PsvdRunConfig:
    """The psvd method's options: the SVD it starts from, then the post-training."""

    svd: SvdConfig = SvdConfig()
    psvd: PsvdConfig = PsvdConfig()

    def check(self) -> None:
        self.svd.check()
        self.psvd.check()
        if self.svd.structure != "factors":
            raise AsrshrinkError(f"psvd refits factorised matrices; --structure {self.svd.structure} is an svd "
                                 f"option only")


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
    pattern: str | None = None                 # "N:M": keep N of every M consecutive weights of a row
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    @property
    def nm(self) -> tuple[int, int] | None:
        """The N:M pattern as (N, M), or None."""
        if self.pattern is None:
            return None
        n, m = (int(v) for v in self.pattern.split(":"))
        return n, m

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
        if self.pattern is not None:
            parts = self.pattern.split(":")
            if len(parts) != 2 or not all(p.isdigit() for p in parts) or not 0 < int(parts[0]) < int(parts[1]):
                raise AsrshrinkError(f"--pattern must be N:M with 0 < N < M (e.g. 2:4), got {self.pattern!r}")
            n, m = self.nm
            if abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise AsrshrinkError(f"--pattern {self.pattern} keeps {n} of "
                                     f"every {m}, a sparsity of {1 - n / m:g}; drop --sparsity or give "
                                     f"--sparsity {1 - n / m:g}")
            if self.global_threshold:
                raise AsrshrinkError(f"--pattern {self.pattern} fixes every matrix's sparsity; drop --global")


SHARE_INITS = ("pick", "mean", "ls")


@dataclass(frozen=True)
class ShareConfig:
    """``asrshrink share``: the layers of ``component`` grouped by ``repeat`` ("R": adjacent groups of R, or an
    index list "0,0,1,1") or ``groups`` ("0-1,2-3"), the ``share_modules`` (empty: all of the family's) sharing
    each group's weights except the ``unshare`` sub-components; shared values by ``init`` (pick: the first
    member's, mean, ls: the least-squares merge on calibration inputs, damped by ``damping``); ``low_rank`` K
    factorises the ``low_rank_parts`` (default the feed-forward modules; ``shared_basis``: one input basis per
    group and coefficients per layer, as Basis Sharing), ``residual_rank`` r adds a per-layer correction;
    ``refit_iterations`` layer-sequential refits of the per-layer parts. A budget
    (``target_params`` / ``compression_ratio`` of the component) chooses the repeat factor instead."""

    repeat: str | None = None
    groups: str | None = None
    share_modules: tuple[str, ...] = ()
    unshare: tuple[str, ...] = ()
    init: str = "ls"
    damping: float = 0.01
    low_rank: int | None = None
    low_rank_parts: tuple[str, ...] = ("ff1", "ff2")
    residual_rank: int | None = None
    shared_basis: bool = False
    refit_iterations: int = 0
    target_params: int | None = None
    compression_ratio: float | None = None
    component: str = "encoder"
    #: Repair: ``finetune_steps`` of distillation (``asrshrink distill``'s loop and losses) on ``data`` with
    #: MODEL as the teacher; 0: none.
    finetune_steps: int = 0
    data: str | None = None
    finetune_lr: float = 5e-4
    checkpoint_every: int = 50
    seed: int = 0

    @property
    def budgeted(self) -> bool:
        return self.target_params is not None or self.compression_ratio is not None

    def distill_config(self, teacher: str) -> "DistillConfig":
        """The repair's distillation options (MODEL as the teacher)."""
        return DistillConfig(data=self.data or "", teacher=teacher, steps=self.finetune_steps, lr=self.finetune_lr,
                             warmup=max(1, min(30, self.finetune_steps // 10)), seed=self.seed,
                             checkpoint_every=self.checkpoint_every, components=(self.component,))

    def check(self) -> None:
        if self.init not in SHARE_INITS:
            raise AsrshrinkError(f"--init must be one of {', '.join(SHARE_INITS)}, got {self.init!r}")
        if not self.damping > 0:
            raise AsrshrinkError(f"--damping must be positive, got {self.damping}")
        if self.repeat is not None and self.groups is not None:
            raise AsrshrinkError("give either --repeat or --groups, not both")
        if self.budgeted and (self.repeat is not None or self.groups is not None):
            raise AsrshrinkError("a budget (--target-params / --compression-ratio) chooses the repeat factor; drop "
                                 "--repeat and --groups")
        if self.target_params is not None and self.compression_ratio is not None:
            raise AsrshrinkError("give either --compression-ratio or --target-params, not both")
        if self.compression_ratio is not None and not self.compression_ratio > 1:
            raise AsrshrinkError(f"--compression-ratio must be above 1, got {self.compression_ratio}")
        if self.target_params is not None and self.target_params <= 0:
            raise AsrshrinkError(f"--target-params must be positive, got {self.target_params}")
        for name in ("low_rank", "residual_rank"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise AsrshrinkError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.refit_iterations < 0:
            raise AsrshrinkError(f"--refit-iterations must be >= 0, got {self.refit_iterations}")
        if self.finetune_steps < 0:
            raise AsrshrinkError(f"--finetune-steps must be >= 0, got {self.finetune_steps}")
        if self.finetune_steps and not self.data:
            raise AsrshrinkError("--finetune-steps distils the shared model on speech: give --data PATH (any "
                                 "--data layout)")
        if self.data and not self.finetune_steps:
            raise AsrshrinkError("--data is the repair's training speech: give --finetune-steps N too")
        if self.finetune_steps and (not self.finetune_lr > 0 or self.checkpoint_every < 1):
            raise AsrshrinkError(f"--finetune-lr must be positive and --checkpoint-every at least 1, got "
                                 f"{self.finetune_lr}, {self.checkpoint_every}")


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


DISTILL_OBJECTIVES = ("truth", "top-beam", "beam")


@dataclass(frozen=True)
class TrainingOptions:
    """The options every training-time method shares: the speech it trains on and the training loop's steps,
    schedule, batches, seed, checkpoint interval, SpecAugment and device, with their checks."""

    data: str = ""
    steps: int = 300
    lr: float = 5e-4
    warmup: int = 30
    max_frames: int = 3000
    max_batch: int = 32
    max_duration: float = 15.0
    seed: int = 0
    checkpoint_every: int = 50
    spec_augment: bool = True
    device: str = "cpu"                        # "cpu", "cuda" or "cuda:N"

    #: What --data is for, in the error that asks for it.
    data_purpose: ClassVar[str] = "to train on"

    def check_training(self, *counts: str) -> None:
        """The shared checks; ``counts`` names the method's own options that must be at least 1."""
        check_device(self.device)
        if not self.data:
            raise AsrshrinkError(f"--data is required: the speech (any --data layout) {self.data_purpose}")
        for name in ("steps", "max_frames", "max_batch", "checkpoint_every", *counts):
            if getattr(self, name) < 1:
                raise AsrshrinkError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise AsrshrinkError(f"--lr must be positive, got {self.lr}")


@dataclass(frozen=True)
class DistillConfig(TrainingOptions):
    """``asrshrink distill``: fine-tune the student (MODEL, or with ``student_config`` a fresh model of MODEL's
    family with those config fields changed) on ``data`` against the ground truth and the teacher's lattice
    distributions, optionally pruning it gradually; ``teacher`` None is MODEL itself (with a fresh student)."""

    data_purpose: ClassVar[str] = "to distill on"
    teacher: str | None = None
    student_config: str | None = None          # JSON object of config fields, e.g. '{"encoder_hidden": 128}'
    rnnt_weight: float = 1.0
    kd_weight: float = 1.0
    temperature: float = 1.0
    collapsed: bool = False
    #: The lattice of the KD term: "truth" (the ground-truth labels), "top-beam" (the teacher's best beam
    #: hypothesis) or "beam" (every one of its ``beam`` hypotheses, weighted by their normalised probabilities).
    objective: str = "truth"
    beam: int = 4
    pseudo_weight: float = 0.0                 # transducer loss on the teacher's top hypothesis (a pseudo-label)
    prune_to: float | None = None
    prune_from: int = 0
    prune_until: int | None = None
    prune_every: int = 20
    components: tuple[str, ...] = ("encoder",)
    #: A folder for the teacher's beams and lattice posteriors, computed once (the teacher is then not loaded).
    teacher_cache: str | None = None

    def check(self) -> None:
        self.check_training("prune_every")
        if self.student_config is None and self.teacher is None:
            raise AsrshrinkError("--teacher is required when MODEL is the student (or give --student-config to "
                                 "distill MODEL into a fresh, smaller model)")
        if self.rnnt_weight < 0 or self.kd_weight < 0 or self.rnnt_weight + self.kd_weight == 0:
            raise AsrshrinkError("--rnnt-weight and --kd-weight must be >= 0 and not both 0")
        if not self.temperature > 0:
            raise AsrshrinkError(f"--temperature must be positive, got {self.temperature}")
        if self.objective not in DISTILL_OBJECTIVES:
            raise AsrshrinkError(f"--objective must be one of {', '.join(DISTILL_OBJECTIVES)}, got {self.objective!r}")
        if self.beam < 1 or self.pseudo_weight < 0:
            raise AsrshrinkError(f"--beam must be at least 1 and --pseudo-weight >= 0, got {self.beam}, "
                                 f"{self.pseudo_weight}")
        if self.prune_to is not None:
            until = self.prune_until if self.prune_until is not None else self.steps
            if not 0 < self.prune_to < 1:
                raise AsrshrinkError(f"--prune-to must be in (0, 1), got {self.prune_to}")
            if not 0 <= self.prune_from < until <= self.steps:
                raise AsrshrinkError(f"need 0 <= --prune-from < --prune-until <= --steps, got {self.prune_from}, "
                                     f"{until}, {self.steps}")


AMNET_BRANCHES = ("mf", "sparse")
AMNET_LOSSES = ("avg", "amr", "avg-then-amr")
#: The paper's branch compressions (Table 1): MF ranks removing 35 % / 60 % of each matrix's parameters, sparse
#: masks at 15 % / 80 %.
AMNET_PAPER = {"mf": (0.35, 0.60), "sparse": (0.15, 0.80)}


@dataclass(frozen=True)
class AmnetConfig(TrainingOptions):
    """``asrshrink amnet-finetune``: turn MODEL's encoder into an AmNet (a slow and a fast branch made from its
    weights, an arbitrator choosing per encoder output frame) and fine-tune it on ``data`` with the transducer
    loss + a compute loss (L_avg, L_amr or L_avg then a short L_amr stage)."""

    data_purpose: ClassVar[str] = "to fine-tune the AmNet on"
    branches: str = "mf"
    #: The share of each matrix removed on the slow / fast branch: MF parameters (rank r = (1 - c) m n / (m + n)),
    #: sparse weights (the sparsity); None: the paper's (mf 0.35 / 0.60, sparse 0.15 / 0.80).
    slow_compression: float | None = None
    fast_compression: float | None = None
    data_aware: bool = False                   # mf: factors of W S (S from the calibration inputs)
    sparse_schedule: str = "gradual"           # sparse: "gradual" (cubic, during the fine-tune) or "magnitude"
    prune_until: int | None = None             # gradual: step at which both masks reach their sparsity
    prune_every: int = 20
    arbitrator_hidden: int | None = None       # None: the paper's 128, shrunk to fit max_arbitrator_share
    arbitrator_layers: int = 2
    arbitrator_feedback: bool = True           # the arbitrator also reads its previous decision d_{t-1}
    max_arbitrator_share: float = 0.025        # of the encoder's parameters
    #: The first steps sample the branches 50/50 at random (the paper's pruning phase); None: 0 for mf, the
    #: gradual pruning phase for sparse.
    random_steps: int | None = None
    #: During the random steps, also train the arbitrator to choose the slow branch where the original model's
    #: output entropy (nats, mean over the label lattice) exceeds this; None: no pre-training.
    entropy_threshold: float | None = None
    tau_start: float = 1.0
    tau_end: float = 0.5
    loss: str = "avg-then-amr"
    amr_steps: int | None = None               # the final L_amr stage of avg-then-amr (None: steps // 5)
    compute_weight: float = 1.0                # lambda of L_avg (relative to the dense encoder's FLOPs per frame)
    latency_weight: float = 1.0                # lambda of L_amr (seconds of modelled response delay)
    mu: float | None = None                    # device FLOPs/s (2 per multiply-add); None: 45 % of real time dense
    rho: float | None = None                   # decision frames per second; None: the model's encoder frame rate

    def compressions(self) -> tuple[float, float]:
        paper = AMNET_PAPER[self.branches] if self.branches in AMNET_PAPER else (0.0, 0.0)
        return (self.slow_compression if self.slow_compression is not None else paper[0],
                self.fast_compression if self.fast_compression is not None else paper[1])

    def phases(self) -> tuple[int, int]:
        """(end of the random-branch phase, start of the L_amr stage) in steps."""
        gradual = self.branches == "sparse" and self.sparse_schedule == "gradual"
        random_end = self.random_steps if self.random_steps is not None else (
            self.pruning_until() if gradual else 0)
        amr_start = {"avg": self.steps, "amr": random_end,
                     "avg-then-amr": self.steps - (self.amr_steps if self.amr_steps is not None
                                                   else self.steps // 5)}[self.loss]
        return random_end, max(amr_start, random_end)

    def pruning_until(self) -> int:
        return self.prune_until if self.prune_until is not None else max(1, int(0.3 * self.steps))

    def check(self) -> None:
        self.check_training("prune_every", "arbitrator_layers")
        if self.branches not in AMNET_BRANCHES:
            raise AsrshrinkError(f"--branches must be one of {', '.join(AMNET_BRANCHES)}, got {self.branches!r}")
        if self.loss not in AMNET_LOSSES:
            raise AsrshrinkError(f"--loss must be one of {', '.join(AMNET_LOSSES)}, got {self.loss!r}")
        if self.sparse_schedule not in ("gradual", "magnitude"):
            raise AsrshrinkError(f"--sparse-schedule must be gradual or magnitude, got {self.sparse_schedule!r}")
        slow, fast = self.compressions()
        if not 0 <= slow < fast < 1:
            raise AsrshrinkError(f"need 0 <= --slow-compression < --fast-compression < 1 (the fast branch is the "
                                 f"more compressed one), got {slow:g} and {fast:g}")
        if self.data_aware and self.branches != "mf":
            raise AsrshrinkError("--data-aware makes data-aware SVD factors: it needs --branches mf")
        if self.arbitrator_hidden is not None and self.arbitrator_hidden < 1:
            raise AsrshrinkError(f"--arbitrator-hidden must be at least 1, got {self.arbitrator_hidden}")
        if not 0 < self.max_arbitrator_share <= 1:
            raise AsrshrinkError(f"--max-arbitrator-share must be in (0, 1], got {self.max_arbitrator_share}")
        if not 0 < self.tau_end <= self.tau_start:
            raise AsrshrinkError(f"need 0 < --tau-end <= --tau-start, got {self.tau_end:g}, {self.tau_start:g}")
        if self.compute_weight < 0 or self.latency_weight < 0:
            raise AsrshrinkError("--compute-weight and --latency-weight must be >= 0")
        for name in ("mu", "rho"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise AsrshrinkError(f"--{name} must be positive, got {value}")
        random_end, amr_start = self.phases()
        if not 0 <= random_end <= self.steps:
            raise AsrshrinkError(f"--random-steps must be in 0..--steps ({self.steps}), got {random_end}")
        if self.amr_steps is not None and not 0 <= self.amr_steps <= self.steps:
            raise AsrshrinkError(f"--amr-steps must be in 0..--steps ({self.steps}), got {self.amr_steps}")
        if self.branches == "sparse" and self.sparse_schedule == "gradual" and not 1 <= self.pruning_until() <= self.steps:
            raise AsrshrinkError(f"--prune-until must be in 1..--steps ({self.steps}), got {self.pruning_until()}")
        if self.entropy_threshold is not None and (not self.entropy_threshold > 0 or random_end == 0):
            raise AsrshrinkError("--entropy-threshold pre-trains the arbitrator during the random-branch steps: it "
                                 "must be positive and needs --random-steps N > 0")


def check_device(device: str) -> None:
    """--device must name a device PyTorch can use here."""
    import re

    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise AsrshrinkError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise AsrshrinkError(f"--device {device}: PyTorch sees no CUDA device on this machine "
                                 f"(torch.cuda.is_available() is False); use --device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise AsrshrinkError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


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
