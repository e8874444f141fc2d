"""Library entry points shared by the CLI and notebooks: load, featurize, encode, decode, evaluate, dump.

No Typer or rich here: long work reports through an optional ``progress(done, total)`` callback.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from asrshrink.audio.datasets import Dataset, open_dataset, read_audio
from asrshrink.errors import DataError
from asrshrink.evaluate.decoding import greedy_decode
from asrshrink.evaluate.wer import char_errors, word_errors
from asrshrink.models.base import Transducer
from asrshrink.models.checkpoint import ModelInfo, load_model, save_model
from asrshrink.models.layers import sparse_matrices, sparse_storage_bytes

__all__ = ["load_model", "save_model", "open_dataset", "featurize", "encode", "transcribe", "evaluate",
           "dump", "EvalResult", "Hypothesis", "ModelInfo", "Transducer", "Dataset", "batches_by_duration"]

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Hypothesis:
    tokens: list[int]
    text: str


def featurize(model: Transducer, waveforms: Sequence[np.ndarray | torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Waveforms (each (N_i,) float at the model's sample rate) -> features (B, T, F) and lengths (B,)."""
    lengths = torch.tensor([len(w) for w in waveforms], dtype=torch.int64)
    batch = torch.zeros(len(waveforms), int(lengths.max()) if len(waveforms) else 0)
    for i, w in enumerate(waveforms):
        batch[i, :len(w)] = torch.as_tensor(np.asarray(w, dtype=np.float32))
    with torch.no_grad():
        return model.featurizer(batch, lengths)


def encode(model: Transducer, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """features (B, T, F), lengths (B,) -> encoder output (B, T', D), lengths (B,)."""
    with torch.no_grad():
        return model.encode(features, lengths)


def transcribe(model: Transducer, waveforms: Sequence[np.ndarray], *,
               max_symbols_per_step: int | None = None) -> list[Hypothesis]:
    """Greedy transcripts of a batch of waveforms."""
    features, lengths = featurize(model, waveforms)
    enc, enc_lengths = encode(model, features, lengths)
    tokens = greedy_decode(model, enc, enc_lengths, max_symbols_per_step)
    return [Hypothesis(t, model.vocabulary.decode(t)) for t in tokens]


def batches_by_duration(durations: Sequence[float], *, max_seconds: float = 240.0, max_batch: int = 32
                        ) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted, longest first), each at most ``max_seconds``
    of padded audio and ``max_batch`` utterances."""
    order = sorted(range(len(durations)), key=lambda i: (-durations[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = durations[current[0]] if current else durations[i]
        if current and (len(current) + 1 > max_batch or longest * (len(current) + 1) > max_seconds):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@dataclass
class EvalResult:
    """Corpus figures of one evaluation; ``hypotheses`` holds one dict per utterance in dataset order."""

    wer: float
    cer: float
    num_utterances: int
    num_words: int
    word_errors: dict[str, int]
    seconds: float
    audio_seconds: float
    hypotheses: list[dict] = field(default_factory=list)

    @property
    def speed(self) -> float:
        """Audio seconds decoded per wall second (featurize + encode + decode)."""
        return self.audio_seconds / max(self.seconds, 1e-9)

    def to_json(self, *, with_hypotheses: bool = False) -> dict:
        data = {"wer": self.wer, "cer": self.cer, "num_utterances": self.num_utterances,
                "num_words": self.num_words, "word_errors": self.word_errors, "seconds": self.seconds,
                "audio_seconds": self.audio_seconds, "speed": self.speed}
        if with_hypotheses:
            data["hypotheses"] = self.hypotheses
        return data


def evaluate(model: Transducer, dataset: Dataset, *, max_batch: int = 32, max_seconds: float = 240.0,
             progress: Progress | None = None) -> EvalResult:
    """Greedy-decode every utterance of ``dataset`` and score corpus WER/CER against its transcripts."""
    if len(dataset) == 0:
        raise DataError(f"{dataset.source}: the dataset is empty")
    start = time.perf_counter()
    durations = [e.duration if e.duration is not None else 0.0 for e in dataset.entries]
    if any(e.duration is None for e in dataset.entries):
        from asrshrink.audio.datasets import _entry_duration
        durations = [_entry_duration(e) for e in dataset.entries]
    results: list[dict | None] = [None] * len(dataset)
    audio_seconds = 0.0
    done = 0
    for batch in batches_by_duration(durations, max_seconds=max_seconds, max_batch=max_batch):
        utterances = [dataset[i] for i in batch]
        try:
            hyps = transcribe(model, [u.audio for u in utterances])
        except DataError as exc:
            bad = min(utterances, key=lambda u: len(u.audio))
            raise DataError(f"{dataset.entries[batch[utterances.index(bad)]].audio_path}: {exc}") from None
        for i, u, h in zip(batch, utterances, hyps):
            results[i] = {"id": u.id, "reference": u.text, "hypothesis": h.text, "duration": u.duration}
            audio_seconds += u.duration
        done += len(batch)
        if progress:
            progress(done, len(dataset))
    rows = [r for r in results if r is not None]
    refs = [r["reference"] for r in rows]
    hyps_text = [r["hypothesis"] for r in rows]
    words = word_errors(refs, hyps_text)
    chars = char_errors(refs, hyps_text)
    return EvalResult(
        wer=words.rate, cer=chars.rate, num_utterances=len(rows), num_words=words.reference_units,
        word_errors={"substitutions": words.substitutions, "deletions": words.deletions,
                     "insertions": words.insertions},
        seconds=time.perf_counter() - start, audio_seconds=audio_seconds, hypotheses=rows)


def dump(model: Transducer, audio_paths: Iterable[str | Path]) -> dict[str, np.ndarray]:
    """For each audio file: ``{stem}.features`` (L, F), ``{stem}.encoder`` (T', D), ``{stem}.tokens`` (n,)."""
    out: dict[str, np.ndarray] = {}
    rate = model.feature_config.sample_rate
    for path in audio_paths:
        path = Path(path)
        stem = path.stem
        if f"{stem}.features" in out:
            raise DataError(f"{path}: two inputs share the file stem {stem!r}; rename one of them")
        try:
            features, lengths = featurize(model, [read_audio(path, rate)])
        except DataError as exc:
            message = str(exc)
            raise DataError(message if message.startswith(str(path)) else f"{path}: {message}") from None
        enc, enc_lengths = encode(model, features, lengths)
        tokens = greedy_decode(model, enc, enc_lengths)[0]
        out[f"{stem}.features"] = features[0, :int(lengths[0])].numpy()
        out[f"{stem}.encoder"] = enc[0, :int(enc_lengths[0])].numpy()
        out[f"{stem}.tokens"] = np.asarray(tokens, dtype=np.int64)
    return out


def describe(model: Transducer, info: ModelInfo | None = None) -> dict:
    """Family, parameters and float32 bytes per component, and FLOPs (2 per multiply-add).

    Also the sizes with pruned matrices stored sparse: ``nonzero_params`` (parameters less the pruned zeros)
    and ``sparse_bytes`` (each pruned matrix as a bit mask plus its non-zeros, eq. 13 of the sparsity paper;
    every other parameter dense), per component and in total; both equal the dense figures without pruning."""
    components = model.components()
    params = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in components.items()}
    nbytes = {name: sum(p.numel() * p.element_size() for p in m.parameters()) for name, m in components.items()}
    nonzero, sparse = {}, {}
    for name, component in components.items():
        nonzero[name], sparse[name] = params[name], nbytes[name]
        for module in component.modules():
            for w in sparse_matrices(module):
                kept = int(w.count_nonzero())
                nonzero[name] -= w.numel() - kept
                sparse[name] += sparse_storage_bytes(w.numel(), kept, w.element_size()) - w.numel() * w.element_size()
    data = {
        "family": model.family,
        "params": int(sum(params.values())),
        "params_by_component": params,
        "bytes": int(sum(nbytes.values())),
        "bytes_by_component": nbytes,
        "nonzero_params": int(sum(nonzero.values())),
        "nonzero_params_by_component": nonzero,
        "sparse_bytes": int(sum(sparse.values())),
        "sparse_bytes_by_component": sparse,
        "flops": {"encoder_per_frame": model.flops()["encoder"],
                  "prediction_per_label": model.flops()["prediction"],
                  "joint_per_evaluation": model.flops()["joint"]},
        "encoder_frame_seconds": model.feature_config.frame_shift_seconds * model.time_reduction,
        "flops_frames": model.flops_frames,
        "encoder_layers": [{"name": name, "params": sum(p.numel() for p in model.get_submodule(name).parameters()),
                            "flops_per_frame": flops} for name, flops in model.flops_by_layer().items()],
        "vocabulary": model.vocabulary.to_json(),
        "config": model.config_dict(),
    }
    if info is not None:
        data.update(path=str(info.path), format=info.kind, sha256=info.sha256, source_sha256=info.source_sha256,
                    structure=info.structure)
    return data

