"""Log-mel features of NeMo's ``AudioToMelSpectrogramPreprocessor`` (``FilterbankFeatures``), in plain PyTorch.

Matches NeMo 3.0 in evaluation mode (no dither, no pad_to beyond the configured one):
pre-emphasis ``[x0, x1 - p x0, ...]`` with samples past each length zeroed -> centred STFT with zero (constant)
padding, symmetric Hann window of ``win_length`` zero-padded to ``n_fft`` -> magnitude ``sqrt(re^2 + im^2)``
raised to ``mag_power`` -> filterbank (Slaney mel, area-normalised) -> ``log(x + 2**-24)`` -> per-feature
normalisation over each utterance's valid frames (mean, N-1 standard deviation, + 1e-5) -> frames at and past
the valid length set to 0.

Valid frames are ``L // hop``; the output has ``max(L) // hop + 1`` frames, like NeMo's. Every operation is
per utterance or masked, so a padded batch gives each utterance its batch-1 values.

Dimension letters: B batch, N samples, T frames, F mel bands.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asrshrink.audio.features import JsonConfig, slaney_mel_filterbank
from asrshrink.errors import DataError

__all__ = ["NemoFeatureConfig", "NemoFeaturizer"]

_LOG_GUARD = 2.0 ** -24
_STD_EPS = 1e-5
_NORMALIZE_TYPES = ("per_feature", "none")


@dataclass(frozen=True)
class NemoFeatureConfig(JsonConfig):
    """``preprocessor`` settings of a NeMo ASR model that asrshrink reproduces (the values NeMo's Conformer
    and FastConformer recipes use are the defaults)."""

    sample_rate: int = 16000
    window_size: float = 0.025
    window_stride: float = 0.01
    n_fft: int = 512
    features: int = 80
    preemph: float = 0.97
    mag_power: float = 2.0
    normalize: str = "per_feature"
    pad_to: int = 0

    kind = "nemo"

    def __post_init__(self) -> None:
        if self.normalize not in _NORMALIZE_TYPES:
            raise ValueError(f"normalize must be one of {_NORMALIZE_TYPES}, got {self.normalize!r}")
        if self.sample_rate <= 0 or self.n_fft <= 0 or self.features <= 0 or self.pad_to < 0:
            raise ValueError(f"invalid feature configuration: {self}")
        if not 0 < self.win_length <= self.n_fft:
            raise ValueError(f"window of {self.win_length} samples must be within 1..n_fft={self.n_fft}")
        if self.hop_length <= 0:
            raise ValueError(f"window_stride {self.window_stride} s gives no samples per hop")

    @property
    def win_length(self) -> int:
        return int(self.window_size * self.sample_rate)  # truncated, as NeMo computes n_window_size

    @property
    def hop_length(self) -> int:
        return int(self.window_stride * self.sample_rate)

    @property
    def feature_dim(self) -> int:
        return self.features

    @property
    def n_mels(self) -> int:
        return self.features

    @property
    def frame_shift_seconds(self) -> float:
        return self.window_stride

    @property
    def min_samples(self) -> int:
        """Fewest samples that featurize: two valid frames, so the N-1 standard deviation is defined."""
        return 2 * self.hop_length

    def featurizer(self) -> "NemoFeaturizer":
        return NemoFeaturizer(self)



class NemoFeaturizer(torch.nn.Module):
    """Waveforms (B, N) plus lengths -> batch-first features (B, T, F) plus valid lengths (B,) int64."""

    def __init__(self, config: NemoFeatureConfig = NemoFeatureConfig()):
        super().__init__()
        self.config = config
        fb = slaney_mel_filterbank(config.sample_rate, config.n_fft, config.features)
        self.register_buffer("mel_fb", fb, persistent=False)
        window = torch.hann_window(config.win_length, periodic=False, dtype=torch.float32)
        self.register_buffer("window", window, persistent=False)

    def output_lengths(self, num_samples: torch.Tensor) -> torch.Tensor:
        """Valid frames per utterance: L // hop (NeMo's ``get_seq_len`` with centred padding)."""
        return torch.div(torch.as_tensor(num_samples).to(torch.int64), self.config.hop_length, rounding_mode="floor")

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """waveforms (B, N) float zero-padded, lengths (B,) samples -> features (B, T, F) float32, lengths (B,)."""
        cfg = self.config
        if waveforms.dim() != 2:
            raise ValueError(f"waveforms must be (B, N), got shape {tuple(waveforms.shape)}")
        lengths = torch.as_tensor(lengths).to(torch.int64).reshape(-1).to(waveforms.device)
        if lengths.numel() and int(lengths.min()) < cfg.min_samples:
            shortest = int(lengths.min())
            raise DataError(f"audio too short: {shortest} samples ({shortest / cfg.sample_rate:.4f} s); at least "
                            f"{cfg.min_samples} samples ({cfg.min_samples / cfg.sample_rate:.4f} s) are needed")
        x = waveforms.to(torch.float32)
        valid = self.output_lengths(lengths)
        time_mask = torch.arange(x.shape[1], device=x.device).unsqueeze(0) < lengths.unsqueeze(1)
        if cfg.preemph:
            x = torch.cat((x[:, :1], x[:, 1:] - cfg.preemph * x[:, :-1]), dim=1)
        x = x.masked_fill(~time_mask, 0.0)
        spec = torch.stft(x, n_fft=cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
                          window=self.window, center=True, pad_mode="constant", return_complex=True)
        mag = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1))          # (B, bins, T)
        if cfg.mag_power != 1.0:
            mag = mag.pow(cfg.mag_power)
        feats = torch.log(torch.matmul(self.mel_fb, mag) + _LOG_GUARD)      # (B, F, T)
        frames = torch.arange(feats.shape[2], device=x.device).unsqueeze(0) < valid.unsqueeze(1)  # (B, T)
        if cfg.normalize == "per_feature":
            count = valid.unsqueeze(1).to(feats.dtype)
            mean = torch.where(frames.unsqueeze(1), feats, 0.0).sum(2) / count
            centred = torch.where(frames.unsqueeze(1), feats - mean.unsqueeze(2), 0.0)
            std = torch.sqrt(centred.pow(2).sum(2) / (count - 1.0))
            std = std.masked_fill(std.isnan(), 0.0) + _STD_EPS
            feats = (feats - mean.unsqueeze(2)) / std.unsqueeze(2)
        feats = feats.masked_fill(~frames.unsqueeze(1), 0.0)
        if cfg.pad_to > 0 and feats.shape[2] % cfg.pad_to:
            feats = torch.nn.functional.pad(feats, (0, cfg.pad_to - feats.shape[2] % cfg.pad_to))
        return feats.transpose(1, 2), valid

    def featurize_one(self, waveform_1d) -> torch.Tensor:
        """One waveform (N,) -> features (T, F), valid frames only."""
        x = torch.as_tensor(waveform_1d, dtype=torch.float32).reshape(1, -1)
        feats, lengths = self.forward(x, torch.tensor([x.shape[1]]))
        return feats[0, :int(lengths[0])]
