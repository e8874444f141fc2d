"""onnxruntime decoding of an asrshrink ONNX export, behind the model methods that featurizing, greedy decoding
and evaluation call, so ``evaluate`` (``asrshrink.evaluate.corpus``) and ``greedy_decode`` run it unchanged.

Dimension letters: B batch, T feature frames, T' encoder frames, U labels, L prediction layers, P prediction
size, J joint hidden size, V outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from asrshrink.audio.features import feature_config_from_json
from asrshrink.audio.text import vocabulary_from_json
from asrshrink.errors import AsrshrinkError
from asrshrink.io import sha256_file
from asrshrink.models.base import State, Transducer
from asrshrink.models.branched import BranchTrace
from asrshrink.models.checkpoint import ModelInfo

PARTS = ("encoder", "decoder", "joiner")
INT8 = ".int8"


def is_export(path: str | Path | None) -> bool:
    """Whether a MODEL argument names an export directory (with encoder.onnx) or one of its .onnx files."""
    if path is None:
        return False
    path = Path(path)
    return (path.is_dir() and (path / "encoder.onnx").is_file()) or path.suffix == ".onnx"


def session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors reach the caller as exceptions; no colored log lines on stderr
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable or invalid files
        raise AsrshrinkError(f"{path}: onnxruntime cannot load it ({str(exc).strip().splitlines()[0][:160]}); "
                             f"export the model again") from None


class OnnxTransducer:
    """An export directory's encoder, decoder and joiner run by onnxruntime; torch tensors in and out, in
    either export layout (see ``asrshrink.export.onnx``).

    ``joint_encoder`` and ``joint_prediction`` pass their input on: in the "asrshrink" layout the graphs'
    outputs already went through the joint's first layer (``projects_joint``), in the "nemo" layout the joiner
    graph applies it. ``threads``: onnxruntime threads of the encoder (None: its default); the per-label decoder
    and joiner run on one thread.
    """

    select_state = staticmethod(Transducer.select_state)

    def __init__(self, directory: str | Path, *, int8: bool = False, threads: int | None = None):
        self.directory = Path(directory)
        self.paths = {part: self.directory / f"{part}{INT8 if int8 else ''}.onnx" for part in PARTS}
        missing = [p.name for p in self.paths.values() if not p.is_file()]
        if missing:
            raise AsrshrinkError(f"{self.directory}: export directory without {', '.join(missing)}; "
                                 f"run asrshrink export again" + (" with --int8" if int8 else ""))
        self.sessions = {part: session(path, threads if part == "encoder" else 1) for part, path in self.paths.items()}
        self.metadata = dict(self.sessions["encoder"].get_modelmeta().custom_metadata_map)
        try:
            self.family = self.metadata["family"]
            self.vocabulary = vocabulary_from_json(json.loads(self.metadata["vocabulary"]))
            self.feature_config = feature_config_from_json(json.loads(self.metadata["feature"]))
            self.state_shape = tuple(json.loads(self.metadata["state_shape"]))   # (L, P)
            self.layout = self.metadata.get("export_layout", "asrshrink")
            self.max_symbols_per_step = int(self.metadata.get("max_symbols_per_step", 30))
            self.time_reduction = int(self.metadata.get("time_reduction", 1))
        except (KeyError, TypeError, ValueError) as exc:
            raise AsrshrinkError(f"{self.paths['encoder']}: not an asrshrink export (metadata {exc} missing or "
                                 f"invalid); export the model again") from None
        if self.layout not in ("asrshrink", "nemo"):
            raise AsrshrinkError(f"{self.paths['encoder']}: unknown export layout {self.layout!r}; upgrade "
                                 f"asrshrink or export the model again")
        self.projects_joint = self.layout == "asrshrink"
        self.featurizer = self.feature_config.featurizer().eval()
        #: An AmNet export's branch and arbitrator costs (``asrshrink.evaluate.amnet.amnet_costs``), else None.
        self.amnet = self._amnet_costs()

    def _amnet_costs(self) -> dict | None:
        if "amnet" not in self.metadata:
            return None
        outputs = [o.name for o in self.sessions["encoder"].get_outputs()]
        try:
            costs = json.loads(self.metadata["amnet"])
            ok = (isinstance(costs, dict) and len(outputs) == 4 and self.layout == "asrshrink"
                  and all(isinstance(v, int) and v >= 0 for v in [*costs["branch_flops"], costs["arbitrator_flops"],
                                                                  costs["arbitrator_params"], costs["dense_flops"]])
                  and len(costs["branch_flops"]) >= 2)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise AsrshrinkError(f"{self.paths['encoder']}: its AmNet metadata or encoder outputs are invalid "
                                 f"(expected the branch costs and 4 outputs, got {outputs}); export the model again")
        return costs

    def eval(self) -> "OnnxTransducer":
        return self

    def _run(self, part: str, **inputs: torch.Tensor) -> list[torch.Tensor]:
        # Inputs are bound by position (sherpa-onnx does the same), so any input names work.
        names = [i.name for i in self.sessions[part].get_inputs()]
        feeds = {name: np.ascontiguousarray(value.detach().numpy()) for name, value in zip(names, inputs.values())}
        return [torch.from_numpy(out) for out in self.sessions[part].run(None, feeds)]

    def encode(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, T, F) float32, lengths (B,) -> encoder_out (B, T', J) ("asrshrink" layout) or the
        encoder output (B, T', D) ("nemo"), lengths (B,) int64."""
        if self.layout == "nemo":
            enc, enc_lengths = self._run("encoder", audio_signal=features.float().transpose(1, 2),
                                         length=lengths.long())
            return enc.transpose(1, 2), enc_lengths
        enc, enc_lengths = self._run("encoder", features=features.float(), feature_lengths=lengths.long())[:2]
        return enc, enc_lengths

    def encode_amortized(self, features: torch.Tensor, lengths: torch.Tensor, *, sampling: str = "hard"
                         ) -> tuple[torch.Tensor, torch.Tensor, BranchTrace]:
        """An AmNet export: features (B, T, F), lengths (B,) -> encoder_out (B, T', J), lengths (B,), and the
        graph's decisions (one-hot, as ``Transducer.encode_amortized`` returns them) with the arbitrator's log pi.
        The graph switches hard: ``sampling`` must be "hard"."""
        if self.amnet is None:
            raise AsrshrinkError(f"{self.directory}: not an AmNet export")
        if sampling != "hard":
            raise AsrshrinkError(f"an ONNX AmNet switches hard; sampling={sampling!r} needs the PyTorch model")
        enc, enc_lengths, branch, log_pi = self._run("encoder", features=features.float(),
                                                     feature_lengths=lengths.long())
        decisions = torch.nn.functional.one_hot(branch, log_pi.shape[-1]).to(log_pi.dtype)
        return enc, enc_lengths, BranchTrace(decisions, log_pi, enc_lengths)

    def joint_encoder(self, enc: torch.Tensor) -> torch.Tensor:
        return enc

    def joint_prediction(self, pred: torch.Tensor) -> torch.Tensor:
        return pred

    def initial_state(self, batch_size: int) -> State:
        layers, size = self.state_shape
        return torch.zeros(layers, batch_size, size), torch.zeros(layers, batch_size, size)

    def predict(self, labels: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """labels (B, U) (blank = start symbol), state (h, c) each (L, B, P) -> decoder_out (B, U, J) or the
        prediction output (B, U, P) ("nemo"), state."""
        if self.layout == "nemo":
            feeds = {"targets": labels.to(torch.int32),
                     "target_length": torch.full((labels.shape[0],), labels.shape[1], dtype=torch.int32),
                     "states.1": state[0], "states.2": state[1]}
            out, _, h, c = self._run("decoder", **feeds)
            return out.transpose(1, 2), (h, c)
        out, h, c = self._run("decoder", targets=labels.long(), h=state[0], c=state[1])
        return out, (h, c)

    def joint_output(self, enc_part: torch.Tensor, pred_part: torch.Tensor) -> torch.Tensor:
        """Broadcastable (..., J) encoder_out and decoder_out (or (..., D) and (..., P) in the "nemo"
        layout) -> logits (..., V)."""
        if self.layout == "nemo":
            shape = torch.broadcast_shapes(enc_part.shape[:-1], pred_part.shape[:-1])
            enc = enc_part.expand(*shape, enc_part.shape[-1]).reshape(-1, enc_part.shape[-1], 1)
            pred = pred_part.expand(*shape, pred_part.shape[-1]).reshape(-1, pred_part.shape[-1], 1)
            (logits,) = self._run("joiner", encoder_outputs=enc, decoder_outputs=pred)  # (N, 1, 1, V)
            return logits.reshape(*shape, logits.shape[-1])
        enc_part, pred_part = torch.broadcast_tensors(enc_part, pred_part)
        shape = enc_part.shape[:-1]
        (logits,) = self._run("joiner", encoder_out=enc_part.reshape(-1, enc_part.shape[-1]),
                              decoder_out=pred_part.reshape(-1, pred_part.shape[-1]))
        return logits.reshape(*shape, logits.shape[-1])


def load_export(path: str | Path, *, threads: int | None = None) -> tuple[OnnxTransducer, ModelInfo]:
    """An export directory, or one of its encoder files (``encoder.int8.onnx`` picks the int8 copies)."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    if not path.is_dir() and path.name not in ("encoder.onnx", f"encoder{INT8}.onnx"):
        raise AsrshrinkError(f"{path}: pass an export directory, or its encoder.onnx or encoder{INT8}.onnx")
    net = OnnxTransducer(directory, int8=path.name == f"encoder{INT8}.onnx", threads=threads)
    compression = json.loads(net.metadata.get("compression", "{}"))
    digest = sha256_file(net.paths["encoder"])
    extra = dict(net.metadata)
    if isinstance(compression.get("method"), dict):  # the method and options the model was made with, as known
        extra["method"] = compression["method"]
    return net, ModelInfo(directory, "onnx", digest, compression.get("source_sha256", digest), extra=extra)
