"""The ``nemo-conformer-transducer`` family: NVIDIA NeMo's Conformer and FastConformer transducers
(``EncDecRNNTBPEModel``, ``EncDecRNNTModel``) at any size, loaded exactly from ``.nemo`` archives.

Computation as NeMo 3.0 in evaluation mode (read from NeMo's source, checked against outputs NeMo computed,
``tests/fixtures/nemo_conformer``):

- encoder: ``pre_encode`` (``striding``: log2(factor) x [Conv2d(k3, s2, p1), ReLU]; ``dw_striding``: Conv2d(k3,
  s2, p1), ReLU, then per further stage a depthwise Conv2d(k3, s2, p1), a 1x1 Conv2d and ReLU; the time mask is
  applied before every stage and at the end; then Linear(C x F' -> d_model) on the channel-major flattening),
  ``xscaling`` by sqrt(d_model), relative sinusoidal positions T-1 .. -(T-1), then per layer
  FF1 (x0.5) -> relative-position self-attention (Transformer-XL biases u, v) -> convolution module (pointwise,
  GLU, padding zeroed, depthwise, batch norm, Swish, pointwise) -> FF2 (x0.5) -> LayerNorm, with a pre-LayerNorm
  before each module.
- prediction network: embedding of V+1 rows (blank is the padding row, the start symbol is the zero vector),
  an LSTM stack.
- joint: enc (D -> J) + pred (P -> J), ReLU, Linear (J -> V+1).
- greedy decoding: at most ``max_symbols`` (10 in NeMo's configs) labels per encoder frame.

Every matrix is its own module a method can reach: attention ``linear_q/k/v/out/pos``, feed-forward
``linear1/2``, the convolution module's ``pointwise_conv1/2`` (NeMo's kernel-1 Conv1d, held as Linear), the
prediction LSTM layers and the joint's Linear layers.

Dimension letters: B batch, T feature frames, T' encoder frames, U labels, F features, D d_model, H heads,
K = D / H, P prediction size, J joint size, V outputs.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from asrshrink.audio.nemo_features import NemoFeatureConfig
from asrshrink.audio.text import vocabulary_from_json
from asrshrink.errors import CheckpointError
from asrshrink.models.base import Block, State, Transducer, check_foreign_state_dict
from asrshrink.models.layers import LSTMStack
from asrshrink.models.registry import register_family

_INF = 10000.0        # NeMo's INF_VAL: masked attention scores, and the sinusoids' base
#: Encoder frames at which ``flops()`` counts attention's sequence-length dependent part (10 s at 40 ms).
FLOPS_FRAMES = 250


@dataclass(frozen=True)
class NemoConformerConfig:
    """Sizes and options of a NeMo Conformer transducer; the defaults are NeMo's Conformer-Small recipe."""

    feat_in: int = 80
    d_model: int = 176
    n_layers: int = 16
    n_heads: int = 4
    ff_expansion_factor: int = 4
    conv_kernel_size: int = 31
    subsampling: str = "striding"           # or "dw_striding"
    subsampling_factor: int = 4
    subsampling_conv_channels: int = 176    # NeMo's -1 resolves to d_model
    xscaling: bool = True
    untie_biases: bool = True
    pred_hidden: int = 320
    pred_rnn_layers: int = 1
    joint_hidden: int = 320
    max_symbols: int = 10
    dropout: float = 0.1
    dropout_pre_encoder: float = 0.1
    dropout_att: float = 0.1
    pred_dropout: float = 0.2
    joint_dropout: float = 0.2
    vocabulary: dict = field(default_factory=dict)    # vocabulary.to_json()
    feature: NemoFeatureConfig = field(default_factory=NemoFeatureConfig)
    nemo_config: str = ""                   # the archive's model_config.yaml, kept to write a .nemo again

    def check(self) -> None:
        for name in ("feat_in", "d_model", "n_layers", "n_heads", "ff_expansion_factor", "conv_kernel_size",
                     "subsampling_factor", "subsampling_conv_channels", "pred_hidden", "pred_rnn_layers",
                     "joint_hidden", "max_symbols"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CheckpointError(f"config {name}={value!r} must be a positive integer")
        if self.subsampling not in ("striding", "dw_striding"):
            raise CheckpointError(f"encoder.subsampling={self.subsampling!r} is not supported (striding, dw_striding)")
        if self.subsampling_factor & (self.subsampling_factor - 1) or self.subsampling_factor < 2:
            raise CheckpointError(f"encoder.subsampling_factor={self.subsampling_factor} must be a power of 2")
        if self.d_model % self.n_heads:
            raise CheckpointError(f"encoder.d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.conv_kernel_size % 2 == 0:
            raise CheckpointError(f"encoder.conv_kernel_size={self.conv_kernel_size} must be odd")

    @property
    def ff_hidden(self) -> int:
        return self.d_model * self.ff_expansion_factor

    @property
    def subsampled_features(self) -> int:
        """Frequency bins left after the subsampling convolutions."""
        f = self.feat_in
        for _ in range(int(math.log2(self.subsampling_factor))):
            f = (f + 2 - 3) // 2 + 1
        return f

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["feature"] = self.feature.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "NemoConformerConfig":
        data = dict(data)
        data["feature"] = NemoFeatureConfig.from_json(data.get("feature", {}))
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise CheckpointError(f"unknown nemo-conformer-transducer config fields: {sorted(unknown)}")
        return cls(**data)


# --- encoder --------------------------------------------------------------------------------------------------

def _time_mask(lengths: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, frames) bool, True for frames before each length."""
    return torch.arange(frames, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


class ConvSubsampling(nn.Module):
    """(B, T, F) features -> (B, T', D), with the time mask applied before every stage (NeMo's
    MaskedConvSequential). ``conv`` is numbered as NeMo's Sequential, activations included."""

    def __init__(self, c: NemoConformerConfig):
        super().__init__()
        channels, stages = c.subsampling_conv_channels, int(math.log2(c.subsampling_factor))
        layers: list[nn.Module] = [nn.Conv2d(1, channels, 3, stride=2, padding=1), nn.ReLU()]
        for _ in range(stages - 1):
            if c.subsampling == "striding":
                layers += [nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU()]
            else:
                layers += [nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels),
                           nn.Conv2d(channels, channels, 1), nn.ReLU()]
        self.conv = nn.ModuleList(layers)
        self.out = nn.Linear(channels * c.subsampled_features, c.d_model)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.unsqueeze(1)                                                # (B, 1, T, F)
        lengths = lengths.to(torch.int64)
        for layer in self.conv:
            x = x * _time_mask(lengths, x.shape[2]).view(x.shape[0], 1, -1, 1).to(x.dtype)
            x = layer(x)
            if isinstance(layer, nn.Conv2d) and layer.stride != (1, 1):
                lengths = torch.div(lengths + 2 - 3, 2, rounding_mode="floor") + 1
        x = x * _time_mask(lengths, x.shape[2]).view(x.shape[0], 1, -1, 1).to(x.dtype)
        b, ch, t, f = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, ch * f)), lengths


def relative_positions(frames: int, d_model: int, device: torch.device | None = None) -> torch.Tensor:
    """Sinusoidal encodings (1, 2T - 1, D) of relative positions T-1 down to -(T-1): even columns sin, odd cos."""
    positions = torch.arange(frames - 1, -frames, -1, dtype=torch.float32, device=device).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32, device=device)
                         * -(math.log(_INF) / d_model))
    angles = positions * div_term                                         # (2T - 1, D / 2)
    return torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).flatten(1).unsqueeze(0)


class RelPositionAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative positions (NeMo's RelPositionMultiHeadAttention)."""

    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.d_k = heads, d_model // heads
        self.linear_q = nn.Linear(d_model, d_model)
        self.linear_k = nn.Linear(d_model, d_model)
        self.linear_v = nn.Linear(d_model, d_model)
        self.linear_out = nn.Linear(d_model, d_model)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, self.d_k))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, att_mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), pos_emb (1, 2T-1, D), att_mask (B, T, T) True where attention is not allowed."""
        b, t, _ = x.shape
        q = self.linear_q(x).view(b, t, self.heads, self.d_k)             # (B, T, H, K)
        k = self.linear_k(x).view(b, t, self.heads, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(b, t, self.heads, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(1, -1, self.heads, self.d_k).transpose(1, 2)  # (1, H, 2T-1, K)
        q_u = (q + self.pos_bias_u).transpose(1, 2)                       # (B, H, T, K)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        bd = self._rel_shift(torch.matmul(q_v, p.transpose(-2, -1)))      # (B, H, T, 2T-1)
        ac = torch.matmul(q_u, k.transpose(-2, -1))                       # (B, H, T, T)
        scores = (ac + bd[..., :t]) / math.sqrt(self.d_k)
        mask = att_mask.unsqueeze(1)
        attn = torch.softmax(scores.masked_fill(mask, -_INF), dim=-1).masked_fill(mask, 0.0)
        out = torch.matmul(self.dropout(attn), v)                         # (B, H, T, K)
        return self.linear_out(out.transpose(1, 2).reshape(b, t, self.heads * self.d_k))

    @staticmethod
    def _rel_shift(x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, 2T-1) scores against positions T-1..-(T-1) -> row i shifted so column j is position i-j."""
        b, h, t, n = x.shape
        x = nn.functional.pad(x, (1, 0)).view(b, h, n + 1, t)
        return x[:, :, 1:].reshape(b, h, t, n)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, hidden: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(d_model, hidden)
        self.linear2 = nn.Linear(hidden, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(nn.functional.silu(self.linear1(x))))


class BatchNorm(nn.BatchNorm1d):
    """BatchNorm1d without the integer step counter, so every saved tensor is floating (with a fixed momentum
    the counter is never read); NeMo's ``num_batches_tracked`` is ignored on loading."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.register_buffer("num_batches_tracked", None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, {**local_metadata, "version": 2}, *args, **kwargs)


class ConvModule(nn.Module):
    """Pointwise (D -> 2D) as Linear, GLU, padded frames zeroed, depthwise conv, batch norm, Swish, pointwise."""

    def __init__(self, d_model: int, kernel: int):
        super().__init__()
        self.pointwise_conv1 = nn.Linear(d_model, 2 * d_model)
        self.depthwise_conv = nn.Conv1d(d_model, d_model, kernel, padding=(kernel - 1) // 2, groups=d_model)
        self.batch_norm = BatchNorm(d_model)
        self.pointwise_conv2 = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), pad_mask (B, T) True on padding -> (B, T, D)."""
        x = nn.functional.glu(self.pointwise_conv1(x), dim=-1)
        x = x.masked_fill(pad_mask.unsqueeze(-1), 0.0).transpose(1, 2)    # (B, D, T)
        x = nn.functional.silu(self.batch_norm(self.depthwise_conv(x)))
        return self.pointwise_conv2(x.transpose(1, 2))


class ConformerLayer(nn.Module):
    def __init__(self, c: NemoConformerConfig):
        super().__init__()
        d = c.d_model
        self.norm_feed_forward1 = nn.LayerNorm(d)
        self.feed_forward1 = FeedForward(d, c.ff_hidden, c.dropout)
        self.norm_self_att = nn.LayerNorm(d)
        self.self_attn = RelPositionAttention(d, c.n_heads, c.dropout_att)
        self.norm_conv = nn.LayerNorm(d)
        self.conv = ConvModule(d, c.conv_kernel_size)
        self.norm_feed_forward2 = nn.LayerNorm(d)
        self.feed_forward2 = FeedForward(d, c.ff_hidden, c.dropout)
        self.norm_out = nn.LayerNorm(d)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, att_mask: torch.Tensor, pad_mask: torch.Tensor
                ) -> torch.Tensor:
        """x (B, T', D) -> (B, T', D)."""
        x = x + 0.5 * self.dropout(self.feed_forward1(self.norm_feed_forward1(x)))
        x = x + self.dropout(self.self_attn(self.norm_self_att(x), pos_emb, att_mask))
        x = x + self.dropout(self.conv(self.norm_conv(x), pad_mask))
        x = x + 0.5 * self.dropout(self.feed_forward2(self.norm_feed_forward2(x)))
        return self.norm_out(x)


class ConformerEncoder(nn.Module):
    def __init__(self, c: NemoConformerConfig):
        super().__init__()
        self.xscale = math.sqrt(c.d_model) if c.xscaling else None
        self.d_model = c.d_model
        self.pre_encode = ConvSubsampling(c)
        self.dropout = nn.Dropout(c.dropout_pre_encoder)
        self.layers = nn.ModuleList(ConformerLayer(c) for _ in range(c.n_layers))
        if not c.untie_biases:  # one (u, v) pair for every layer, as NeMo builds it
            for layer in self.layers[1:]:
                layer.self_attn.pos_bias_u = self.layers[0].self_attn.pos_bias_u
                layer.self_attn.pos_bias_v = self.layers[0].self_attn.pos_bias_v

    def prepare(self, features: torch.Tensor, lengths: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Subsampling, scaling and masks: features (B, T, F) -> x (B, T', D), lengths, and the per-layer
        context (pos_emb, att_mask, pad_mask)."""
        x, lengths = self.pre_encode(features, lengths)
        if self.xscale is not None:
            x = x * self.xscale
        x = self.dropout(x)
        return x, lengths, self.context(x.shape[1], lengths)

    def context(self, frames: int, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        valid = _time_mask(lengths, frames)                               # (B, T')
        return {"pos_emb": relative_positions(frames, self.d_model, lengths.device),
                "att_mask": ~(valid.unsqueeze(1) & valid.unsqueeze(2)), "pad_mask": ~valid}

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, T, F), lengths (B,) -> (B, T', D), lengths (B,) int64."""
        x, lengths, ctx = self.prepare(features, lengths)
        for layer in self.layers:
            x = layer(x, ctx["pos_emb"], ctx["att_mask"], ctx["pad_mask"])
        return x, lengths


# --- prediction and joint -------------------------------------------------------------------------------------

class Prediction(nn.Module):
    def __init__(self, c: NemoConformerConfig, vocab_size: int):
        super().__init__()
        self.blank = vocab_size - 1
        self.embed = nn.Embedding(vocab_size, c.pred_hidden, padding_idx=self.blank)
        self.rnn = LSTMStack(c.pred_hidden, c.pred_hidden, c.pred_rnn_layers, dropout=c.pred_dropout,
                             forget_gate_bias=1.0)

    def forward(self, labels: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """labels (B, U) (blank = the start symbol, a zero vector), state (h, c) each (L, B, P) -> (B, U, P)."""
        x = self.embed(labels) * (labels != self.blank).unsqueeze(-1)
        y, state = self.rnn(x.transpose(0, 1), state)
        return y.transpose(0, 1), state


class Joint(nn.Module):
    def __init__(self, c: NemoConformerConfig, vocab_size: int):
        super().__init__()
        self.enc = nn.Linear(c.d_model, c.joint_hidden)
        self.pred = nn.Linear(c.pred_hidden, c.joint_hidden)
        self.dropout = nn.Dropout(c.joint_dropout)
        self.output = nn.Linear(c.joint_hidden, vocab_size)

    def forward(self, enc_part: torch.Tensor, pred_part: torch.Tensor) -> torch.Tensor:
        return self.output(self.dropout(torch.relu(enc_part + pred_part)))


@register_family("nemo-conformer-transducer")
class NemoConformerTransducer(Transducer):
    """NeMo Conformer / FastConformer transducer."""

    export_layout = "nemo"

    def __init__(self, config: NemoConformerConfig):
        config.check()
        if config.feat_in != config.feature.feature_dim:
            raise CheckpointError(f"encoder.feat_in={config.feat_in} does not match the preprocessor's "
                                  f"{config.feature.feature_dim} features")
        vocabulary = vocabulary_from_json(config.vocabulary)
        super().__init__(config.feature, vocabulary)
        self.max_symbols_per_step = config.max_symbols
        self.config = config
        self.encoder = ConformerEncoder(config)
        self.prediction = Prediction(config, vocabulary.size)
        self.joint_net = Joint(config, vocabulary.size)

    # --- configuration -------------------------------------------------------------------------------------
    config_class = NemoConformerConfig

    @property
    def time_reduction(self) -> int:
        return self.config.subsampling_factor

    def blocks(self, component: str) -> list[Block]:
        """The encoder as subsampling followed by one block per Conformer layer (x (T', B, D)); the prediction
        network as its LSTM layers."""
        if component == "encoder":
            enc = self.encoder

            def subsample(x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                y, lengths, _ = enc.prepare(x.transpose(0, 1), lengths)
                return y.transpose(0, 1), lengths

            def layer_block(i: int, layer: ConformerLayer) -> Block:
                def run(x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                    ctx = enc.context(x.shape[0], lengths)
                    return layer(x.transpose(0, 1), ctx["pos_emb"], ctx["att_mask"], ctx["pad_mask"]
                                 ).transpose(0, 1), lengths
                return Block(f"encoder.layers.{i}", layer, run)

            return ([Block("encoder.pre_encode", None, subsample)]
                    + [layer_block(i, m) for i, m in enumerate(enc.layers)])
        if component == "prediction":
            return [Block(f"prediction.rnn.layers.{i}", m, lambda x, lengths, m=m: (m(x)[0], lengths))
                    for i, m in enumerate(self.prediction.rnn.layers)]
        raise CheckpointError(f"component {component!r} has no blocks; choose encoder or prediction")

    def sharing_layout(self, component: str = "encoder"):
        """The Conformer layers as the sharing paper's modules: ff1 (feed-forward start), attn, conv, ff2
        (feed-forward end, with the layer's closing norm_out); sub-components by the paper's Fig. 1 (linear1,
        linear2; query, key, value, out, pos; pre, depthwise, post), and misc: norms, biases, batch norm,
        position biases."""
        from asrshrink.models.sharing import ShareLayout

        if component != "encoder":
            raise CheckpointError(f"--component {component}: only the encoder's Conformer layers can share weights")
        parts = {"norm_feed_forward1": ("ff1", "norm"), "feed_forward1.linear1": ("ff1", "linear1"),
                 "feed_forward1.linear2": ("ff1", "linear2"), "norm_self_att": ("attn", "norm"),
                 "self_attn.linear_q": ("attn", "query"), "self_attn.linear_k": ("attn", "key"),
                 "self_attn.linear_v": ("attn", "value"), "self_attn.linear_out": ("attn", "out"),
                 "self_attn.linear_pos": ("attn", "pos"), "self_attn.pos_bias_u": ("attn", "pos_bias"),
                 "self_attn.pos_bias_v": ("attn", "pos_bias"), "norm_conv": ("conv", "norm"),
                 "conv.pointwise_conv1": ("conv", "pre"), "conv.depthwise_conv": ("conv", "depthwise"),
                 "conv.batch_norm": ("conv", "batch_norm"), "conv.pointwise_conv2": ("conv", "post"),
                 "norm_feed_forward2": ("ff2", "norm"), "feed_forward2.linear1": ("ff2", "linear1"),
                 "feed_forward2.linear2": ("ff2", "linear2"), "norm_out": ("ff2", "norm_out")}
        matrices = {part: (name, "linear") for name, part in parts.items()
                    if part[1] not in ("norm", "norm_out", "pos_bias", "batch_norm", "depthwise")}
        return ShareLayout("encoder", tuple(f"encoder.layers.{i}" for i in range(len(self.encoder.layers))),
                           ("ff1", "attn", "conv", "ff2"), parts, ("norm", "norm_out", "pos_bias", "batch_norm"),
                           matrices, low_rank_parts=tuple(matrices),
                           channels={part: name for name, part in parts.items()
                                     if part[1] in ("norm", "norm_out", "batch_norm", "depthwise")})

    def weight_targets(self, components: list[str] | tuple[str, ...]) -> list:
        """Registration order except that each attention's ``linear_pos`` comes before its ``linear_out`` (the
        order of the forward pass); its inputs are the relative position encodings (layout "relative")."""
        from dataclasses import replace

        targets = super().weight_targets(components)
        out = [replace(t, layout="relative") if t.layer.endswith(".self_attn.linear_pos") else t for t in targets]
        for i, t in enumerate(out):
            if t.layer.endswith(".self_attn.linear_pos") and i and out[i - 1].layer == t.layer[:-3] + "out":
                out[i - 1], out[i] = out[i], out[i - 1]
        return out

    def input_groups(self, targets: list) -> list[list]:
        """One group per matrix, except an attention's q, k and v, which read the same normalised input."""
        groups: list[list] = []
        for t in targets:
            shared = t.layer.endswith((".linear_k", ".linear_v")) and groups and \
                groups[-1][-1].layer.rsplit(".", 1)[0] == t.layer.rsplit(".", 1)[0]
            if shared:
                groups[-1].append(t)
            else:
                groups.append([t])
        return groups

    def block_inputs(self, component: str, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if component == "encoder":
            return batch["features"].transpose(0, 1), batch["feature_lengths"]
        if component == "prediction":
            labels = batch["labels"]
            start = torch.full((labels.shape[0], 1), self.vocabulary.blank, dtype=labels.dtype)
            history = torch.cat([start, labels], 1)
            x = self.prediction.embed(history) * (history != self.vocabulary.blank).unsqueeze(-1)
            return x.transpose(0, 1), batch["label_lengths"] + 1
        raise CheckpointError(f"component {component!r} has no blocks; choose encoder or prediction")

    def flops(self) -> dict[str, int]:
        """FLOPs (2 per multiply-add, matrix products only) per encoder output frame at ``FLOPS_FRAMES``
        frames (attention's scores, position projections and weighted sums grow with the sequence)."""
        return {"encoder": sum(self.flops_by_layer().values()),
                "prediction": sum(layer.flops_per_step() for layer in self.prediction.rnn.layers),
                "joint": _module_matmul_flops(self.joint_net)}

    flops_frames = FLOPS_FRAMES

    def flops_by_layer(self, frames: int = FLOPS_FRAMES) -> dict[str, int]:
        """FLOPs per encoder output frame of ``encoder.pre_encode`` and each ``encoder.layers.N`` at ``frames``
        encoder frames."""
        c = self.config
        out = {"encoder.pre_encode": _subsampling_flops(c)}
        for i, layer in enumerate(self.encoder.layers):
            att = layer.self_attn
            dense = _module_matmul_flops(layer) - _module_matmul_flops(att.linear_pos)
            positions = (2 * frames - 1) * _module_matmul_flops(att.linear_pos) // frames
            scores = 2 * c.d_model * (frames + (2 * frames - 1) + frames)  # q.k, q.p and attention . v
            depthwise = 2 * c.d_model * c.conv_kernel_size
            out[f"encoder.layers.{i}"] = dense + positions + scores + depthwise
        return out

    # --- computation ---------------------------------------------------------------------------------------
    def encode(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(features, lengths)

    @property
    def aux_dim(self) -> int:
        return self.config.d_model

    def joint_encoder(self, enc: torch.Tensor) -> torch.Tensor:
        return self.joint_net.enc(enc)

    def joint_prediction(self, pred: torch.Tensor) -> torch.Tensor:
        return self.joint_net.pred(pred)

    # --- NeMo's layout -------------------------------------------------------------------------------------
    @classmethod
    def matches_foreign(cls, state_dict: dict[str, torch.Tensor]) -> bool:
        return (any(k.startswith("encoder.pre_encode.") for k in state_dict)
                and "decoder.prediction.embed.weight" in state_dict)

    @classmethod
    def from_foreign(cls, state_dict: dict[str, torch.Tensor], source: str, *, config: dict | None = None,
                     files: dict[str, bytes] | None = None) -> "NemoConformerTransducer":
        from asrshrink.models.nemo_archive import config_from_nemo

        if config is None:
            raise CheckpointError(f"{source}: a NeMo state dict without its model config; pass the .nemo archive "
                                  f"(it holds model_config.yaml and the tokenizer)")
        c = config_from_nemo(config, files or {}, state_dict, source)
        try:
            with torch.device("meta"):  # shapes only: nothing is allocated until they match the tensors
                skeleton = cls(c)
        except CheckpointError as exc:
            raise CheckpointError(f"{source}: {exc}") from None
        check_foreign_state_dict(skeleton.to_foreign_state_dict(), state_dict, source,
                                 "weights do not match model_config.yaml", ignore=(".num_batches_tracked",))
        featurizer = c.feature.featurizer()
        for key, ours in (("preprocessor.featurizer.fb", featurizer.mel_fb.unsqueeze(0)),
                          ("preprocessor.featurizer.window", featurizer.window)):
            if not torch.allclose(state_dict[key].to(torch.float32), ours, atol=1e-6, rtol=0):
                raise CheckpointError(f"{source}: {key} differs from the standard one for these preprocessor "
                                      f"settings; custom filterbanks and windows are not supported")
        if not c.untie_biases:
            for name in ("pos_bias_u", "pos_bias_v"):
                first = state_dict[f"encoder.layers.0.self_attn.{name}"]
                for i in range(1, c.n_layers):
                    if not torch.equal(state_dict[f"encoder.layers.{i}.self_attn.{name}"], first):
                        raise CheckpointError(f"{source}: encoder.untie_biases is false but "
                                              f"encoder.layers.{i}.self_attn.{name} differs from layer 0's")
        model = cls(c)
        model.load_state_dict(_from_foreign_keys(state_dict, c), strict=True)
        return model

    def to_foreign_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict in NeMo's layout (``EncDecRNNTBPEModel.state_dict()`` names and shapes)."""
        c = self.config
        out: dict[str, torch.Tensor] = {
            "preprocessor.featurizer.window": self.featurizer.window.detach().clone(),
            "preprocessor.featurizer.fb": self.featurizer.mel_fb.detach().unsqueeze(0).clone(),
        }
        for key, tensor in self.encoder.state_dict().items():
            name = f"encoder.{key}"
            if re.search(r"\.conv\.pointwise_conv[12]\.weight$", name):
                tensor = tensor.unsqueeze(-1)                             # Linear (O, I) -> Conv1d (O, I, 1)
            out[name] = tensor.detach().clone()
            if name.endswith(".conv.batch_norm.running_var"):
                out[name.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
        out["decoder.prediction.embed.weight"] = self.prediction.embed.weight.detach().clone()
        for i, layer in enumerate(self.prediction.rnn.layers):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                out[f"decoder.prediction.dec_rnn.lstm.{name}_l{i}"] = getattr(layer.lstm, f"{name}_l0").detach().clone()
        j = self.joint_net
        out["joint.pred.weight"], out["joint.pred.bias"] = j.pred.weight.detach().clone(), j.pred.bias.detach().clone()
        out["joint.enc.weight"], out["joint.enc.bias"] = j.enc.weight.detach().clone(), j.enc.bias.detach().clone()
        last = 2 if c.joint_dropout > 0 else 1  # NeMo's joint_net is [ReLU, (Dropout,) Linear]
        out[f"joint.joint_net.{last}.weight"] = j.output.weight.detach().clone()
        out[f"joint.joint_net.{last}.bias"] = j.output.bias.detach().clone()
        return out


def _from_foreign_keys(sd: dict[str, torch.Tensor], c: NemoConformerConfig) -> dict[str, torch.Tensor]:
    """NeMo keys -> this module's names (float32; kernel-1 convolutions as Linear weights)."""
    out: dict[str, torch.Tensor] = {}
    lstm = re.compile(r"^decoder\.prediction\.dec_rnn\.lstm\.(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)$")
    for key, tensor in sd.items():
        if key.startswith("preprocessor.") or key.endswith(".num_batches_tracked"):
            continue
        tensor = tensor.detach().to(torch.float32)
        if key.startswith("encoder."):
            if re.search(r"\.conv\.pointwise_conv[12]\.weight$", key):
                tensor = tensor.squeeze(-1)
            out[key] = tensor
        elif key == "decoder.prediction.embed.weight":
            out["prediction.embed.weight"] = tensor
        elif (m := lstm.match(key)):
            out[f"prediction.rnn.layers.{m.group(2)}.lstm.{m.group(1)}_l0"] = tensor
        elif key.startswith(("joint.enc.", "joint.pred.")):
            out["joint_net." + key[len("joint."):]] = tensor
        elif re.fullmatch(r"joint\.joint_net\.\d+\.(weight|bias)", key):
            out[f"joint_net.output.{key.rsplit('.', 1)[1]}"] = tensor
    return out


def _module_matmul_flops(module: nn.Module) -> int:
    """2 x multiply-adds of every Linear (dense or factorised) inside ``module``, per input vector."""
    from asrshrink.models.layers import LowRankLinear

    total = 0
    for m in module.modules():
        if isinstance(m, LowRankLinear):
            total += m.flops()
        elif isinstance(m, nn.Linear):
            total += 2 * m.in_features * m.out_features
    return total


def _subsampling_flops(c: NemoConformerConfig) -> int:
    """Convolutions and the output Linear of ``pre_encode`` per encoder output frame."""
    ch, f, total = c.subsampling_conv_channels, c.feat_in, 0
    for stage in range(int(math.log2(c.subsampling_factor))):
        f = (f + 2 - 3) // 2 + 1
        frames_per_output = c.subsampling_factor // 2 ** (stage + 1)  # this stage's outputs per encoder frame
        if stage == 0:
            per_position = 2 * 9 * ch
        elif c.subsampling == "striding":
            per_position = 2 * 9 * ch * ch
        else:
            per_position = 2 * 9 * ch + 2 * ch * ch
        total += per_position * f * frames_per_output
    return total + 2 * ch * f * c.d_model

