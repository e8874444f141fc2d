"""The ``mlperf-rnnt`` family: the MLPerf RNN-T topology at any size, and its released checkpoint layout.

Topology (every size configurable): encoder = LSTM x ``encoder_pre_layers`` -> time stacking x
``stack_time_factor`` -> LSTM x ``encoder_post_layers``; prediction = embedding with no blank row (blank stands
for the zero start vector) -> LSTM x ``pred_layers``; joint = Linear(D + P -> J), ReLU, Dropout, Linear(J -> V).
The joint's first Linear is held as two modules, the encoder and prediction column blocks, so decoding can
project each encoder frame once; the checkpoint key map joins and splits them.

Dimension letters: B batch, T feature frames, T' encoder frames, U labels, H hidden sizes, V outputs.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from asrshrink.audio.features import FeatureConfig
from asrshrink.audio.text import Vocabulary
from asrshrink.errors import CheckpointError
from asrshrink.models.base import Block, State, Transducer, check_foreign_state_dict
from asrshrink.models.branched import Arbitrator, BranchedLSTMLayer, BranchTrace
from asrshrink.models.layers import LowRankLinear, LSTMStack, mask_time, model_structure, stack_time
from asrshrink.models.registry import register_family

#: The MLPerf RNN-T labels in id order: space, a-z, apostrophe. Blank is appended after them (id 28).
MLPERF_LABELS: tuple[str, ...] = (" ", *"abcdefghijklmnopqrstuvwxyz", "'")


@dataclass(frozen=True)
class MlperfRnntConfig:
    """Sizes of an MLPerf-topology RNN-T. The defaults are the MLPerf reference model (45.3 M parameters)."""

    input_dim: int = 240
    encoder_hidden: int = 1024
    encoder_pre_layers: int = 2
    stack_time_factor: int = 2
    encoder_post_layers: int = 3
    pred_hidden: int = 320
    pred_layers: int = 2
    joint_hidden: int = 512
    dropout: float = 0.32
    forget_gate_bias: float = 1.0
    labels: tuple[str, ...] = MLPERF_LABELS
    feature: FeatureConfig = field(default_factory=FeatureConfig)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = list(self.labels)
        data["feature"] = self.feature.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "MlperfRnntConfig":
        data = dict(data)
        data["labels"] = tuple(data.get("labels", MLPERF_LABELS))
        data["feature"] = FeatureConfig.from_json(data.get("feature", {}))
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise CheckpointError(f"unknown mlperf-rnnt config fields: {sorted(unknown)}")
        return cls(**data)


class Encoder(nn.Module):
    def __init__(self, c: MlperfRnntConfig):
        super().__init__()
        self.stack_time_factor = c.stack_time_factor
        self.pre_rnn = LSTMStack(c.input_dim, c.encoder_hidden, c.encoder_pre_layers, dropout=c.dropout,
                                 forget_gate_bias=c.forget_gate_bias)
        self.post_rnn = LSTMStack(c.stack_time_factor * c.encoder_hidden, c.encoder_hidden, c.encoder_post_layers,
                                  dropout=c.dropout, forget_gate_bias=c.forget_gate_bias)
        self.arbitrator: Arbitrator | None = None  # an AmNet's (``MlperfRnnt.attach_arbitrator``)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """features (B, T, F), lengths (B,) -> output (B, T', H), lengths (B,) with T' = ceil(T / factor),
        and the pre-stacking activations (B, T, H)."""
        if self.arbitrator is not None:  # an AmNet runs with hard switching unless trained through forward_amortized
            return self.forward_amortized(features, lengths)[:3]
        low, _ = self.pre_rnn(features.transpose(0, 1))            # (T, B, H)
        # Frames past an utterance's end are zero before stacking, as they are when it runs alone (batch 1).
        low = mask_time(low, lengths)
        x, lengths = stack_time(low, lengths, self.stack_time_factor)  # (T', B, factor * H)
        x, _ = self.post_rnn(x)                                    # (T', B, H)
        return x.transpose(0, 1), lengths.to(torch.int64), low.transpose(0, 1)

    def forward_amortized(self, features: torch.Tensor, lengths: torch.Tensor, *, sampling: str = "hard",
                          temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, BranchTrace]:
        """The AmNet encoder (an ``arbitrator`` attached, the LSTM layers branched): one decision per encoder
        output frame t' (after time stacking), read from the stacked features of the factor feature frames
        that frame covers; the layers below the stacking use that decision for each of those frames.

        features (B, T, F), lengths (B,) -> output (B, T', H), lengths (B,), the pre-stacking activations
        (B, T, H), and the decisions."""
        factor = self.stack_time_factor
        x = mask_time(features.transpose(0, 1), lengths)              # (T, B, F)
        stacked, out_lengths = stack_time(x, lengths, factor)          # (T', B, factor * F)
        decisions, log_pi = self.arbitrator(stacked, sampling=sampling, temperature=temperature)  # (T', B, N)
        low_decisions = decisions.repeat_interleave(factor, 0)[:x.shape[0]]                     # (T, B, N)
        hard = sampling == "hard"

        def run(stack: LSTMStack, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
            for layer in stack.layers:
                x = layer(x, d, hard=hard)[0] if getattr(layer, "takes_decisions", False) else layer(x)[0]
                x = stack.dropout(x)
            return x

        low = mask_time(run(self.pre_rnn, x, low_decisions), lengths)  # (T, B, H)
        y, out_lengths = stack_time(low, lengths, factor)
        y = run(self.post_rnn, y, decisions)                           # (T', B, H)
        trace = BranchTrace(decisions.transpose(0, 1), log_pi.transpose(0, 1), out_lengths.to(torch.int64))
        return y.transpose(0, 1), out_lengths.to(torch.int64), low.transpose(0, 1), trace


class Prediction(nn.Module):
    def __init__(self, c: MlperfRnntConfig):
        super().__init__()
        self.blank = len(c.labels)
        self.embed = nn.Embedding(len(c.labels), c.pred_hidden)  # no row for blank
        self.rnn = LSTMStack(c.pred_hidden, c.pred_hidden, c.pred_layers, dropout=c.dropout,
                             forget_gate_bias=c.forget_gate_bias)

    def forward(self, labels: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """labels (B, U), blank = start symbol (zero vector); state (h, c) each (L, B, P) -> (B, U, P), state."""
        is_label = labels != self.blank
        x = self.embed(torch.where(is_label, labels, 0)) * is_label.unsqueeze(-1)  # (B, U, P)
        y, state = self.rnn(x.transpose(0, 1), state)
        return y.transpose(0, 1), state


class Joint(nn.Module):
    def __init__(self, c: MlperfRnntConfig):
        super().__init__()
        self.encoder_proj = nn.Linear(c.encoder_hidden, c.joint_hidden)
        self.prediction_proj = nn.Linear(c.pred_hidden, c.joint_hidden, bias=False)
        self.dropout = nn.Dropout(c.dropout) if c.dropout > 0 else nn.Identity()
        self.output = nn.Linear(c.joint_hidden, len(c.labels) + 1)
        # Same initialisation as one Linear(D + P -> J): uniform with bound 1/sqrt(D + P).
        bound = (c.encoder_hidden + c.pred_hidden) ** -0.5
        for tensor in (self.encoder_proj.weight, self.encoder_proj.bias, self.prediction_proj.weight):
            nn.init.uniform_(tensor, -bound, bound)

    def forward(self, enc_part: torch.Tensor, pred_part: torch.Tensor) -> torch.Tensor:
        return self.output(self.dropout(torch.relu(enc_part + pred_part)))


@register_family("mlperf-rnnt")
class MlperfRnnt(Transducer):
    """MLPerf-topology LSTM RNN-T."""

    def __init__(self, config: MlperfRnntConfig = MlperfRnntConfig()):
        if config.input_dim != config.feature.feature_dim:
            raise CheckpointError(f"input_dim {config.input_dim} does not match the featurizer's "
                                  f"{config.feature.feature_dim} features (80 mels x 3 spliced frames); "
                                  f"this is not an MLPerf-featurizer model")
        super().__init__(config.feature, Vocabulary(labels=config.labels, blank=len(config.labels)))
        self.config = config
        self.encoder = Encoder(config)
        self.prediction = Prediction(config)
        self.joint_net = Joint(config)

    # --- configuration -------------------------------------------------------------------------------------
    config_class = MlperfRnntConfig

    @property
    def time_reduction(self) -> int:
        return self.config.stack_time_factor

    def blocks(self, component: str) -> list[Block]:
        def layer_block(prefix: str, i: int, layer: nn.Module) -> Block:
            return Block(f"{prefix}.layers.{i}", layer, lambda x, lengths: (layer(x)[0], lengths))

        if component == "encoder":
            factor = self.config.stack_time_factor
            return ([layer_block("encoder.pre_rnn", i, m) for i, m in enumerate(self.encoder.pre_rnn.layers)]
                    + [Block("encoder.stack_time", None, lambda x, lengths: stack_time(mask_time(x, lengths),
                                                                                       lengths, factor))]
                    + [layer_block("encoder.post_rnn", i, m) for i, m in enumerate(self.encoder.post_rnn.layers)])
        if component == "prediction":
            return [layer_block("prediction.rnn", i, m) for i, m in enumerate(self.prediction.rnn.layers)]
        raise CheckpointError(f"component {component!r} has no LSTM blocks; choose encoder or prediction")

    def block_inputs(self, component: str, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if component == "encoder":
            return batch["features"].transpose(0, 1), batch["feature_lengths"]
        if component == "prediction":
            labels = batch["labels"]
            start = torch.full((labels.shape[0], 1), self.vocabulary.blank, dtype=labels.dtype)
            history = torch.cat([start, labels], 1)
            is_label = history != self.vocabulary.blank
            x = self.prediction.embed(torch.where(is_label, history, 0)) * is_label.unsqueeze(-1)
            return x.transpose(0, 1), batch["label_lengths"] + 1
        raise CheckpointError(f"component {component!r} has no LSTM blocks; choose encoder or prediction")

    def sharing_layout(self, component: str = "encoder"):
        """The encoder's post-stack LSTM layers (after the time stacking) as one module kind, lstm, with the
        sub-components ih and hh (the input and recurrent matrices); misc: the biases. Only layers of equal
        shape can share (the first post-stack layer reads the stacked frames)."""
        from asrshrink.models.sharing import ShareLayout

        if component != "encoder":
            raise CheckpointError(f"--component {component}: only the encoder's post-stack LSTM layers can share "
                                  f"weights")
        parts = {"lstm.weight_ih_l0": ("lstm", "ih"), "lstm.bias_ih_l0": ("lstm", "ih"),
                 "lstm.weight_hh_l0": ("lstm", "hh"), "lstm.bias_hh_l0": ("lstm", "hh"),
                 "ih": ("lstm", "ih"), "hh": ("lstm", "hh")}
        return ShareLayout("encoder", tuple(f"encoder.post_rnn.layers.{i}"
                                            for i in range(len(self.encoder.post_rnn.layers))),
                           ("lstm",), parts, (), {("lstm", "ih"): ("", "ih"), ("lstm", "hh"): ("", "hh")})

    def projection_readers(self, layer: str) -> list[tuple[str, int]]:
        stacks = [("encoder.pre_rnn", self.encoder.pre_rnn, ("encoder.post_rnn.layers.0",
                                                             self.config.stack_time_factor)),
                  ("encoder.post_rnn", self.encoder.post_rnn, ("joint_net.encoder_proj", 1)),
                  ("prediction.rnn", self.prediction.rnn, ("joint_net.prediction_proj", 1))]
        for prefix, stack, after in stacks:
            count = len(stack.layers)
            for i in range(count):
                if layer == f"{prefix}.layers.{i}":
                    return [(f"{prefix}.layers.{i + 1}", 1) if i + 1 < count else after]
        raise CheckpointError(f"{layer} is not an LSTM layer of this mlperf-rnnt model")

    def check_sizes(self) -> None:
        """Every module reads what the module before it gives (a projected layer gives r features, not H)."""
        pre, post, pred = (list(s.layers) for s in (self.encoder.pre_rnn, self.encoder.post_rnn, self.prediction.rnn))
        if not (pre and post and pred):
            return  # a config without layers; its tensors are refused by shape
        j = self.joint_net
        chain = ([("encoder.pre_rnn.layers", pre, self.config.input_dim, 1),
                  ("encoder.post_rnn.layers", post, self.config.stack_time_factor * pre[-1].output_size, 1),
                  ("prediction.rnn.layers", pred, self.config.pred_hidden, 1)])
        for prefix, layers, first, _ in chain:
            sizes = [first] + [layer.output_size for layer in layers[:-1]]
            for i, (layer, size) in enumerate(zip(layers, sizes)):
                if layer.input_size != size:
                    raise CheckpointError(f"{prefix}.{i} takes {layer.input_size} inputs where it is given {size}; "
                                          f"the file was written by another asrshrink version or edited")
        for name, linear, size in (("joint_net.encoder_proj", j.encoder_proj, post[-1].output_size),
                                   ("joint_net.prediction_proj", j.prediction_proj, pred[-1].output_size)):
            if linear.in_features != size:
                raise CheckpointError(f"{name} takes {linear.in_features} inputs where it is given {size}; the "
                                      f"file was written by another asrshrink version or edited")

    def flops(self) -> dict[str, int]:
        c = self.config
        j = self.joint_net

        def linear(m: nn.Module) -> int:
            return m.flops() if isinstance(m, LowRankLinear) else 2 * m.in_features * m.out_features

        joint = linear(j.encoder_proj) + linear(j.prediction_proj) + 2 * c.joint_hidden * (len(c.labels) + 1)
        return {
            "encoder": sum(self.flops_by_layer().values()),
            "prediction": sum(layer.flops_per_step() for layer in self.prediction.rnn.layers),
            "joint": joint,
        }

    def flops_by_layer(self) -> dict[str, int]:
        """Per encoder output frame; an AmNet's branched layers count their slow branch (the most a frame can
        cost) and its arbitrator one decision (see ``branch_flops`` for each branch)."""
        factor = self.config.stack_time_factor  # layers below the stacking run factor times per output frame
        out = {f"encoder.pre_rnn.layers.{i}": factor * m.flops_per_step()
               for i, m in enumerate(self.encoder.pre_rnn.layers)}
        out.update({f"encoder.post_rnn.layers.{i}": m.flops_per_step() for i, m in enumerate(self.encoder.post_rnn.layers)})
        if self.encoder.arbitrator is not None:
            out[self.arbitrator_slot] = self.encoder.arbitrator.flops_per_step()
        return out

    # --- AmNet (asrshrink.training.amnet) ------------------------------------------------------------------
    arbitrator_slot = "encoder.arbitrator"

    @property
    def arbitrator_input_size(self) -> int:
        """The arbitrator reads one decision frame: the factor stacked feature frames of an encoder output frame."""
        return self.config.stack_time_factor * self.config.input_dim

    @property
    def arbitrator(self) -> Arbitrator | None:
        return self.encoder.arbitrator

    def attach_arbitrator(self, arbitrator: Arbitrator) -> None:
        self.encoder.arbitrator = arbitrator

    def branch_layer_rates(self) -> dict[str, int]:
        """Every encoder LSTM layer by name, with how many of its time steps one decision frame covers."""
        factor = self.config.stack_time_factor
        out = {f"encoder.pre_rnn.layers.{i}": factor for i in range(len(self.encoder.pre_rnn.layers))}
        out.update({f"encoder.post_rnn.layers.{i}": 1 for i in range(len(self.encoder.post_rnn.layers))})
        return out

    def branch_flops(self) -> list[int]:
        """Encoder FLOPs of one decision (output) frame on each branch, without the arbitrator (unbranched layers
        count in full on every branch)."""
        rates = self.branch_layer_rates()
        branches = self.encoder.arbitrator.branches
        totals = [0] * branches
        for name, rate in rates.items():
            layer = self.get_submodule(name)
            for n in range(branches):
                totals[n] += rate * (layer.flops_per_step(n) if isinstance(layer, BranchedLSTMLayer)
                                     else layer.flops_per_step())
        return totals

    def encode_amortized(self, features: torch.Tensor, lengths: torch.Tensor, *, sampling: str = "hard",
                         temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, BranchTrace]:
        enc, enc_lengths, _, trace = self.encoder.forward_amortized(features, lengths, sampling=sampling,
                                                                    temperature=temperature)
        return enc, enc_lengths, trace

    def apply_structure(self, structure: dict[str, Any]) -> None:
        structure = dict(structure)
        spec = structure.pop(self.arbitrator_slot, None)
        super().apply_structure(structure)
        if spec is not None:
            from asrshrink.models.layers import build_layer

            self.attach_arbitrator(build_layer(spec))
        self.check_sizes()

    # --- computation ---------------------------------------------------------------------------------------
    def encode(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc, enc_lengths, _ = self.encoder(features, lengths)
        return enc, enc_lengths

    def encode_with_aux(self, features: torch.Tensor, lengths: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Also returns the lower encoder's output (before time stacking), where an auxiliary CTC loss helps
        a small model converge from scratch."""
        enc, enc_lengths, low = self.encoder(features, lengths)
        return enc, enc_lengths, low, lengths.to(torch.int64)

    @property
    def aux_dim(self) -> int:
        return self.encoder.pre_rnn.layers[-1].output_size

    def joint_encoder(self, enc: torch.Tensor) -> torch.Tensor:
        return self.joint_net.encoder_proj(enc)

    def joint_prediction(self, pred: torch.Tensor) -> torch.Tensor:
        return self.joint_net.prediction_proj(pred)

    # --- the released checkpoint layout --------------------------------------------------------------------
    @classmethod
    def matches_foreign(cls, state_dict: dict[str, torch.Tensor]) -> bool:
        return ("encoder.pre_rnn.lstm.weight_ih_l0" in state_dict
                and "prediction.dec_rnn.lstm.weight_ih_l0" in state_dict)

    @classmethod
    def from_foreign(cls, state_dict: dict[str, torch.Tensor], source: str, *, config: dict | None = None,
                     files: dict[str, bytes] | None = None) -> "MlperfRnnt":
        # The inference code's spelling of the joint (joint.net.N) loads like the training one (joint_net.N).
        state_dict = {("joint_net." + k[len("joint.net."):] if k.startswith("joint.net.") else k): v
                      for k, v in state_dict.items()}
        config = _config_from_foreign(state_dict, source)
        try:
            model = cls(config)
        except CheckpointError as exc:
            raise CheckpointError(f"{source}: {exc}") from None
        check_foreign_state_dict(model.to_foreign_state_dict(), state_dict, source,
                                 "not a complete mlperf-rnnt checkpoint")
        mapped = _from_foreign_keys(state_dict, config)
        # The featurizer buffers are recomputed from the feature config (as the reference does), not loaded.
        mapped.update({k: v for k, v in model.state_dict().items() if k.startswith("featurizer.")})
        model.load_state_dict(mapped, strict=True)
        return model

    def to_foreign_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict in the released MLPerf checkpoint layout (training names, fused multi-layer LSTMs)."""
        c = self.config
        out: dict[str, torch.Tensor] = {
            "audio_preprocessor.featurizer.fb": self.featurizer.mel_fb.detach().unsqueeze(0).clone(),
            "audio_preprocessor.featurizer.window": self.featurizer.window.detach().clone(),
        }
        for prefix, stack in (("encoder.pre_rnn.lstm", self.encoder.pre_rnn),
                              ("encoder.post_rnn.lstm", self.encoder.post_rnn)):
            out.update(_fused_lstm_keys(prefix, stack))
        out["prediction.embed.weight"] = self.prediction.embed.weight.detach().clone()
        out.update(_fused_lstm_keys("prediction.dec_rnn.lstm", self.prediction.rnn))
        j = self.joint_net
        out["joint_net.0.weight"] = torch.cat([j.encoder_proj.weight, j.prediction_proj.weight], 1).detach().clone()
        out["joint_net.0.bias"] = j.encoder_proj.bias.detach().clone()
        last = 3 if c.dropout > 0 else 2  # the reference numbers its Sequential with a Dropout only if p > 0
        out[f"joint_net.{last}.weight"] = j.output.weight.detach().clone()
        out[f"joint_net.{last}.bias"] = j.output.bias.detach().clone()
        return out


_LSTM_KEY = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)$")


def _fused_lstm_keys(prefix: str, stack: LSTMStack) -> dict[str, torch.Tensor]:
    out = {}
    for i, layer in enumerate(stack.layers):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            out[f"{prefix}.{name}_l{i}"] = getattr(layer.lstm, f"{name}_l0").detach().clone()
    return out


def _count_layers(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    return sum(1 for k in state_dict if k.startswith(prefix + ".weight_ih_l"))


def _config_from_foreign(sd: dict[str, torch.Tensor], source: str) -> MlperfRnntConfig:
    def shape(key: str) -> tuple[int, ...]:
        if key not in sd or not isinstance(sd[key], torch.Tensor):
            raise CheckpointError(f"{source}: not a complete mlperf-rnnt checkpoint: missing key {key}")
        if sd[key].dim() != 2 or min(sd[key].shape) < 1:
            raise CheckpointError(f"{source}: tensor {key} has shape {tuple(sd[key].shape)}, expected a non-empty "
                                  f"matrix; pass an intact mlperf-rnnt checkpoint")
        return tuple(sd[key].shape)

    wih0 = shape("encoder.pre_rnn.lstm.weight_ih_l0")
    hidden = shape("encoder.pre_rnn.lstm.weight_hh_l0")[1]
    post_in = shape("encoder.post_rnn.lstm.weight_ih_l0")[1]
    embed = shape("prediction.embed.weight")
    joint0 = shape("joint_net.0.weight")
    outputs = [k for k in sd if re.fullmatch(r"joint_net\.[1-9]\d*\.weight", k)]
    if len(outputs) != 1:
        raise CheckpointError(f"{source}: expected one joint output layer joint_net.N.weight, found {outputs}")
    last = int(outputs[0].split(".")[1])
    num_out = shape(outputs[0])[0]
    if post_in % hidden or embed[0] + 1 != num_out:
        raise CheckpointError(f"{source}: inconsistent mlperf-rnnt sizes (post_rnn input {post_in}, hidden "
                              f"{hidden}, {embed[0]} embedding rows, {num_out} joint outputs)")
    labels = MLPERF_LABELS if embed[0] == len(MLPERF_LABELS) else tuple(f"<{i}>" for i in range(embed[0]))
    return MlperfRnntConfig(
        input_dim=wih0[1], encoder_hidden=hidden,
        encoder_pre_layers=_count_layers(sd, "encoder.pre_rnn.lstm"), stack_time_factor=post_in // hidden,
        encoder_post_layers=_count_layers(sd, "encoder.post_rnn.lstm"), pred_hidden=embed[1],
        pred_layers=_count_layers(sd, "prediction.dec_rnn.lstm"), joint_hidden=joint0[0],
        dropout=0.32 if last == 3 else 0.0, labels=labels)


def _from_foreign_keys(sd: dict[str, torch.Tensor], c: MlperfRnntConfig) -> dict[str, torch.Tensor]:
    """Map released-checkpoint keys onto this module's names (tensors cast to float32)."""
    out: dict[str, torch.Tensor] = {}
    stacks = {"encoder.pre_rnn.lstm": "encoder.pre_rnn", "encoder.post_rnn.lstm": "encoder.post_rnn",
              "prediction.dec_rnn.lstm": "prediction.rnn"}
    for key, tensor in sd.items():
        tensor = tensor.detach().to(torch.float32)
        prefix, _, name = key.rpartition(".")
        m = _LSTM_KEY.match(name)
        if prefix in stacks and m:
            out[f"{stacks[prefix]}.layers.{m.group(2)}.lstm.{m.group(1)}_l0"] = tensor
        elif key == "prediction.embed.weight":
            out[key] = tensor
        elif key == "joint_net.0.weight":
            out["joint_net.encoder_proj.weight"] = tensor[:, :c.encoder_hidden]
            out["joint_net.prediction_proj.weight"] = tensor[:, c.encoder_hidden:]
        elif key == "joint_net.0.bias":
            out["joint_net.encoder_proj.bias"] = tensor
        elif re.fullmatch(r"joint_net\.[1-9]\d*\.(weight|bias)", key):
            out[f"joint_net.output.{name}"] = tensor
    return out
