"""The interface every transducer family implements, so that decoding, evaluation, compression and export
never need to know a family's layer names.

Dimension letters: B batch, T feature frames, T' encoder frames, U labels, D encoder output size,
P prediction output size, J joint hidden size, V joint outputs (labels + blank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from asrshrink.audio.features import FeatureConfig
from asrshrink.audio.text import SentencePieceVocabulary, Vocabulary

if TYPE_CHECKING:
    from asrshrink.models.targets import WeightTarget

State = tuple[torch.Tensor, ...]  # prediction-network state; every tensor has the batch on dim 1


@dataclass
class Block:
    """One step of a component run as a chain: (x (T, B, D), lengths (B,)) -> (x (T', B, D'), lengths).

    ``layer`` is the compressible layer the step runs (an LSTM layer), or None for a parameter-free step such
    as time stacking. ``name`` is the layer's dotted name in the model.
    """

    name: str
    layer: nn.Module | None
    run: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def check_foreign_state_dict(expected: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor], source: str,
                             what: str, ignore: tuple[str, ...] = ()) -> None:
    """Refuse a foreign checkpoint whose keys, shapes or dtypes differ from ``expected`` (the family's layout for
    the sizes it inferred), in one line naming up to five keys; keys ending in ``ignore`` are not compared."""
    from asrshrink.errors import CheckpointError

    wanted = {k: v for k, v in expected.items() if not k.endswith(ignore)} if ignore else expected
    present = [k for k in state_dict if not (ignore and k.endswith(ignore))]
    missing = [k for k in wanted if k not in state_dict]
    unexpected = [k for k in present if k not in wanted]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else ""))
        raise CheckpointError(f"{source}: {what}: {'; '.join(parts)}")
    for key, ref in wanted.items():
        got = state_dict[key]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(ref.shape):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise CheckpointError(f"{source}: tensor {key} has shape {shape}, expected {tuple(ref.shape)} "
                                  f"for the sizes of this model")
        if not got.is_floating_point():
            raise CheckpointError(f"{source}: tensor {key} has dtype {got.dtype}, expected a float tensor")


class Transducer(nn.Module):
    """A transducer: encoder, prediction network and joint network, plus its featurizer and vocabulary.

    Subclasses set ``family`` (the registry name) and implement the abstract methods.
    """

    family: str = ""
    #: Decoding rule: at most this many labels are emitted at one encoder frame (MLPerf 30, NeMo 10).
    max_symbols_per_step: int = 30
    #: ONNX layout ``asrshrink export`` writes: "asrshrink" (the joint's first layer folded into the encoder and
    #: decoder graphs) or "nemo" (sherpa-onnx's ``nemo_transducer`` interface).
    export_layout: str = "asrshrink"

    @property
    def time_reduction(self) -> int:
        """Feature frames per encoder frame."""
        raise NotImplementedError

    def __init__(self, feature_config: FeatureConfig, vocabulary: Vocabulary | SentencePieceVocabulary):
        super().__init__()
        self.feature_config = feature_config  # any featurizer config: FeatureConfig, NemoFeatureConfig
        self.vocabulary = vocabulary
        self.featurizer = feature_config.featurizer()

    # --- configuration -------------------------------------------------------------------------------------
    #: The family's frozen config dataclass (with to_json / from_json); ``self.config`` holds an instance.
    config_class: type = object

    def config_dict(self) -> dict[str, Any]:
        """JSON-serialisable configuration from which ``from_config_dict`` rebuilds the same architecture."""
        return self.config.to_json()

    @classmethod
    def from_config_dict(cls, config: dict[str, Any]) -> "Transducer":
        return cls(cls.config_class.from_json(config))

    def apply_structure(self, structure: dict[str, Any]) -> None:
        """Rebuild the compressed modules (low rank, ...) that a saved model's ``structure`` names, in place."""
        from asrshrink.errors import CheckpointError
        from asrshrink.models.layers import build_layer

        for name, spec in structure.items():
            try:
                self.get_submodule(name)
                self.set_submodule(name, build_layer(spec))
            except (AttributeError, KeyError, ValueError, TypeError) as exc:
                raise CheckpointError(f"cannot rebuild compressed module {name!r} ({exc}); the file was written "
                                      f"by another asrshrink version or edited") from None

    def projection_readers(self, layer: str) -> list[tuple[str, int]]:
        """The modules that read LSTM layer ``layer``'s output h_t, each with the number of column blocks of
        its input matrix that read h (a time stacking of k frames reads [h_t; ...; h_{t+k-1}]: k blocks), in
        forward order: what ``svd --structure projection`` rewrites to read the projection m_t = P h_t.
        Default: none known, so the family's LSTM layers cannot be projected."""
        from asrshrink.errors import AsrshrinkError

        raise AsrshrinkError(f"--structure projection: the {self.family} family does not say which modules read "
                             f"{layer}'s output; use the default --structure factors")

    @classmethod
    def matches_foreign(cls, state_dict: dict[str, torch.Tensor]) -> bool:
        """Whether ``state_dict`` is this family's training-checkpoint layout."""
        return False

    @classmethod
    def from_foreign(cls, state_dict: dict[str, torch.Tensor], source: str, *, config: dict | None = None,
                     files: dict[str, bytes] | None = None) -> "Transducer":
        """Build and load a model from this family's training-checkpoint state dict (exact, shape-checked);
        ``config`` and ``files`` are the model config and side files of an archive format that has them."""
        raise NotImplementedError

    def blocks(self, component: str) -> list[Block]:
        """``component`` (e.g. "encoder") as a chain of blocks, so calibration can run it block by block."""
        raise NotImplementedError

    def block_inputs(self, component: str, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The first block's input (T, B, D) and lengths for a batch with features, feature_lengths, labels,
        label_lengths (labels are needed only by the prediction network)."""
        raise NotImplementedError

    def weight_targets(self, components: list[str] | tuple[str, ...]) -> "list[WeightTarget]":
        """The compressible matrices of ``components`` in forward order (see ``models.targets``). Default:
        registration order; a Linear's inputs batch first (B, T, ...), an LSTM layer's time first."""
        from asrshrink.models.targets import enumerate_targets

        return enumerate_targets(self, components)

    def input_groups(self, targets: "list[WeightTarget]") -> "list[list[WeightTarget]]":
        """``targets`` of one block in groups that one calibration pass can serve: the members of a group read
        inputs that do not depend on each other's outputs (true sequential between groups, in order). Default:
        one group per module (an LSTM layer's two matrices together)."""
        groups: list[list] = []
        for t in targets:
            if groups and groups[-1][0].layer == t.layer:
                groups[-1].append(t)
            else:
                groups.append([t])
        return groups

    def components(self) -> dict[str, nn.Module]:
        """The model's parts by role: {"encoder": ..., "prediction": ..., "joint": ...} (the modules a family
        names ``encoder``, ``prediction`` and ``joint_net``)."""
        return {"encoder": self.encoder, "prediction": self.prediction, "joint": self.joint_net}

    def flops(self) -> dict[str, int]:
        """FLOPs (2 per multiply-add) of: ``encoder`` per encoder output frame, ``prediction`` per label
        step, ``joint`` per joint evaluation."""
        raise NotImplementedError

    def flops_by_layer(self) -> dict[str, int]:
        """FLOPs per encoder output frame of each encoder layer (dotted module name -> FLOPs); they sum to
        ``flops()["encoder"]``."""
        raise NotImplementedError

    # --- weight sharing (``asrshrink share``; see models.sharing) -------------------------------------------
    #: The model's sharing plan (a ``models.sharing.SharingPlan``), None when no tensors are shared.
    sharing: Any = None

    def sharing_layout(self, component: str = "encoder") -> Any:
        """The ``models.sharing.ShareLayout`` of ``component``: its layers that may share weights and which of
        their tensors form which module kind and sub-component. Default: none."""
        from asrshrink.errors import AsrshrinkError

        raise AsrshrinkError(f"the {self.family} family declares no layers that can share weights")

    # --- AmNet support (a family that has it overrides these; see mlperf_rnnt) ------------------------------
    #: The dotted name under which an AmNet's arbitrator is attached; None: the family has no AmNet encoder.
    arbitrator_slot: str | None = None

    @property
    def arbitrator(self) -> nn.Module | None:
        """The AmNet arbitrator, or None for a model that is not an AmNet."""
        return None

    def encode_amortized(self, features: torch.Tensor, lengths: torch.Tensor, *, sampling: str = "hard",
                         temperature: float = 1.0):
        """An AmNet's encoder output, lengths and ``BranchTrace`` (decisions per encoder output frame)."""
        from asrshrink.errors import AsrshrinkError

        raise AsrshrinkError(f"{self.family} models have no AmNet encoder (amnet-finetune supports mlperf-rnnt)")

    #: The encoder frames at which sequence-length dependent FLOPs (attention) are counted; None if there are none.
    flops_frames: int | None = None

    # --- computation ---------------------------------------------------------------------------------------
    def encode(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, T, F), lengths (B,) -> encoder output (B, T', D), lengths (B,) int64."""
        raise NotImplementedError

    def encode_with_aux(self, features: torch.Tensor, lengths: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoder output and lengths, plus an intermediate representation (B, T_aux, aux_dim) and its lengths
        on which training may put an auxiliary loss (CTC). Default: the encoder output itself."""
        enc, enc_lengths = self.encode(features, lengths)
        return enc, enc_lengths, enc, enc_lengths

    @property
    def aux_dim(self) -> int:
        """Feature size of the intermediate representation returned by ``encode_with_aux``."""
        raise NotImplementedError

    def initial_state(self, batch_size: int) -> State:
        """Prediction-network state before any label, for ``batch_size`` utterances: zeros (h, c) each (L, B, P)
        for a family whose ``prediction`` module runs an LSTM stack ``rnn``."""
        layers = self.prediction.rnn.layers
        shape = (len(layers), batch_size, layers[0].hidden_size)
        weight = next(self.prediction.parameters())
        return (weight.new_zeros(shape), weight.new_zeros(shape))

    def predict(self, labels: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """labels (B, U) int64, where the blank id stands for the start symbol -> output (B, U, P), new state.
        Default: the family's ``prediction`` module."""
        return self.prediction(labels, state)

    def joint_encoder(self, enc: torch.Tensor) -> torch.Tensor:
        """The encoder's share of the joint's first layer: (..., D) -> (..., J). Cacheable per frame."""
        raise NotImplementedError

    def joint_prediction(self, pred: torch.Tensor) -> torch.Tensor:
        """The prediction network's share of the joint's first layer: (..., P) -> (..., J)."""
        raise NotImplementedError

    def joint_output(self, enc_part: torch.Tensor, pred_part: torch.Tensor) -> torch.Tensor:
        """Combine broadcastable (..., J) shares into unnormalised logits (..., V). Default: the family's
        ``joint_net`` module."""
        return self.joint_net(enc_part, pred_part)

    def joint(self, enc: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Joint network on broadcastable enc (..., D) and pred (..., P) -> logits (..., V)."""
        return self.joint_output(self.joint_encoder(enc), self.joint_prediction(pred))

    @staticmethod
    def select_state(mask: torch.Tensor, new: State, old: State) -> State:
        """Per utterance, take ``new`` where mask (B,) is true, else ``old``."""
        return tuple(torch.where(mask.view(1, -1, *([1] * (n.dim() - 2))), n, o) for n, o in zip(new, old))

    def forward(self, features: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training forward: features (B, T, F), lengths (B,), labels (B, U) -> logits (B, T', U+1, V), T'."""
        enc, enc_lengths = self.encode(features, lengths)
        start = torch.full((labels.shape[0], 1), self.vocabulary.blank, dtype=labels.dtype, device=labels.device)
        pred, _ = self.predict(torch.cat([start, labels], dim=1), self.initial_state(labels.shape[0]))
        return self.joint(enc.unsqueeze(2), pred.unsqueeze(1)), enc_lengths
