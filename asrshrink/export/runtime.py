"""onnxruntime decoding of an asrshrink ONNX export, behind the model methods that featurizing, greedy decoding
and evaluation call, so ``api.evaluate`` and ``greedy_decode`` run it unchanged.

Dimension letters: B batch, T feature frames, T' encoder frames, U labels, L prediction layers, P prediction
size, J joint hidden size, V outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from asrshrink.audio.features import FeatureConfig, Featurizer
from asrshrink.audio.text import Vocabulary
from asrshrink.errors import AsrshrinkError
from asrshrink.io import sha256_file
from asrshrink.models.base import State, Transducer
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
    """An export directory's encoder, decoder and joiner run by onnxruntime; torch tensors in and out.

    ``encoder_out`` and ``decoder_out`` already went through the joint's first layer, so ``joint_encoder`` and
    ``joint_prediction`` pass them on as they are. ``threads``: onnxruntime threads of the encoder (None: its
    default); the per-label decoder and joiner run on one thread.
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
            self.vocabulary = Vocabulary.from_json(json.loads(self.metadata["vocabulary"]))
            self.feature_config = FeatureConfig.from_json(json.loads(self.metadata["feature"]))
            self.state_shape = tuple(json.loads(self.metadata["state_shape"]))   # (L, P)
        except (KeyError, TypeError, ValueError) as exc:
            raise AsrshrinkError(f"{self.paths['encoder']}: not an asrshrink export (metadata {exc} missing or "
                                 f"invalid); export the model again") from None
        self.featurizer = Featurizer(self.feature_config).eval()

    def eval(self) -> "OnnxTransducer":
        return self

    def _run(self, part: str, **inputs: torch.Tensor) -> list[torch.Tensor]:
        feeds = {name: np.ascontiguousarray(value.detach().numpy()) for name, value in inputs.items()}
        return [torch.from_numpy(out) for out in self.sessions[part].run(None, feeds)]

    def encode(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, T, F) float32, lengths (B,) -> encoder_out (B, T', J), lengths (B,) int64."""
        enc, enc_lengths = self._run("encoder", features=features.float(), feature_lengths=lengths.long())
        return enc, enc_lengths

    def joint_encoder(self, enc: torch.Tensor) -> torch.Tensor:
        return enc

    def joint_prediction(self, pred: torch.Tensor) -> torch.Tensor:
        return pred

    def initial_state(self, batch_size: int) -> State:
        layers, size = self.state_shape
        return torch.zeros(layers, batch_size, size), torch.zeros(layers, batch_size, size)

    def predict(self, labels: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """labels (B, U) (blank = start symbol), state (h, c) each (L, B, P) -> decoder_out (B, U, J), state."""
        out, h, c = self._run("decoder", targets=labels.long(), h=state[0], c=state[1])
        return out, (h, c)

    def joint_output(self, enc_part: torch.Tensor, pred_part: torch.Tensor) -> torch.Tensor:
        """Broadcastable (..., J) encoder_out and decoder_out -> logits (..., V)."""
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
    return net, ModelInfo(directory, "onnx", digest, compression.get("source_sha256", digest), extra=net.metadata)
