"""Log-mel filterbank features of the MLPerf RNN-T reference ("input_eval", ``logfbank``).

The pipeline, all in float32 torch ops in the same order as the reference featurizer:
pre-emphasis -> STFT (centred, reflect padded, symmetric Hann) -> power (+ dither**2) -> Slaney mel matrix ->
natural log with a guard -> splice 3 frames with log-domain zero padding -> per-utterance, per-feature
normalisation with the unbiased std + 1e-5 -> trim to L = ceil(ceil(N / hop) / splice) frames.

A padded batch gives every utterance exactly its batch-1 result: the spectral stages run on each utterance's
own samples (so reflect padding happens at its own end), frames past its own STFT length are zero before
splicing, and every row gets the same 1e-5 in the normaliser (the reference's batch-position dependent epsilon
is not reproduced).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from asrshrink.errors import DataError

__all__ = ["FeatureConfig", "Featurizer", "feature_config_from_json", "slaney_mel_filterbank", "spec_augment"]

_NORMALIZE_TYPES = ("per_feature", "none")


class JsonConfig:
    """JSON round trip of a featurizer config dataclass, tagged with its ``kind``."""

    kind = ""

    def to_json(self) -> dict:
        return {"kind": self.kind, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict):
        data = {k: v for k, v in data.items() if k != "kind"}
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown feature configuration keys: {unknown}")
        return cls(**data)


@dataclass(frozen=True)
class FeatureConfig(JsonConfig):
    """Featurizer settings; the defaults are the MLPerf RNN-T evaluation configuration."""

    sample_rate: int = 16000
    n_fft: int = 512
    window_size: float = 0.02  # seconds, symmetric Hann window
    window_stride: float = 0.01  # seconds between STFT frames
    n_mels: int = 80
    preemph: float = 0.97
    frame_splicing: int = 3
    dither: float = 1e-5  # evaluation behaviour: dither**2 is added to every power bin; 0 disables it
    log_guard: float = 1e-20
    normalize: str = "per_feature"  # or "none"

    kind = "mlperf"

    def __post_init__(self) -> None:
        if self.normalize not in _NORMALIZE_TYPES:
            raise ValueError(f"normalize must be one of {_NORMALIZE_TYPES}, got {self.normalize!r}")
        if self.sample_rate <= 0 or self.n_fft <= 0 or self.n_mels <= 0 or self.frame_splicing < 1:
            raise ValueError(f"invalid feature configuration: {self}")
        if not 0 < self.win_length <= self.n_fft:
            raise ValueError(f"window of {self.win_length} samples must be within 1..n_fft={self.n_fft}")
        if self.hop_length <= 0:
            raise ValueError(f"window_stride {self.window_stride} s gives no samples per hop")
        if self.dither < 0:
            raise ValueError(f"dither must be >= 0, got {self.dither}")

    @property
    def win_length(self) -> int:
        """Window length in samples."""
        return int(round(self.window_size * self.sample_rate))

    @property
    def hop_length(self) -> int:
        """STFT hop in samples."""
        return int(round(self.window_stride * self.sample_rate))

    @property
    def feature_dim(self) -> int:
        """Size of one output feature vector (mel bands times spliced frames)."""
        return self.n_mels * self.frame_splicing

    @property
    def frame_shift_seconds(self) -> float:
        """Time between two output feature frames."""
        return self.window_stride * self.frame_splicing

    @property
    def min_samples(self) -> int:
        """Fewest samples that featurize: more than n_fft // 2 and, when normalising, at least 2 frames."""
        n = self.n_fft // 2 + 1
        if self.normalize == "per_feature":
            # L >= 2 needs ceil(N / hop) > splice, i.e. N > splice * hop.
            n = max(n, self.frame_splicing * self.hop_length + 1)
        return n

    def featurizer(self) -> "Featurizer":
        return Featurizer(self)



def feature_config_from_json(data: dict):
    """The featurizer settings a ``to_json`` dict describes: ``kind`` "mlperf" (the default, for files written
    before kinds existed) or "nemo"."""
    kind = data.get("kind", FeatureConfig.kind)
    if kind == FeatureConfig.kind:
        return FeatureConfig.from_json(data)
    if kind == "nemo":
        from asrshrink.audio.nemo_features import NemoFeatureConfig

        return NemoFeatureConfig.from_json(data)
    raise ValueError(f"unknown featurizer kind {kind!r}; known: mlperf, nemo")


def _hz_to_mel_slaney(freq: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above (ln 6.4 / 27 per mel)."""
    freq = np.asarray(freq, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    mels = freq / f_sp
    high = freq >= min_log_hz
    mels = np.where(high, min_log_mel + np.log(np.maximum(freq, min_log_hz) / min_log_hz) / logstep, mels)
    return mels


def _mel_to_hz_slaney(mels: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_hz_to_mel_slaney`."""
    mels = np.asarray(mels, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    freqs = f_sp * mels
    high = mels >= min_log_mel
    return np.where(high, min_log_hz * np.exp(logstep * (mels - min_log_mel)), freqs)


def slaney_mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                          fmax: float | None = None) -> torch.Tensor:
    """Triangular mel filterbank ``(n_mels, n_fft // 2 + 1)`` float32 on the Slaney scale with area normalisation.

    Computed in float64. As in librosa's defaults, the triangle weights are rounded to float32 before the
    normalisation factor 2 / (f[m + 2] - f[m]) is applied, and the product is rounded to float32 again.
    """
    if fmax is None:
        fmax = sample_rate / 2.0
    if not 0.0 <= fmin < fmax:
        raise ValueError(f"need 0 <= fmin < fmax, got fmin={fmin}, fmax={fmax}")
    n_bins = n_fft // 2 + 1
    bin_freqs = np.arange(n_bins, dtype=np.float64) * (1.0 / (n_fft * (1.0 / sample_rate)))
    mel_points = np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2)
    edges = _mel_to_hz_slaney(mel_points)  # (n_mels + 2,) band edges and centres in Hz
    widths = np.diff(edges)
    offsets = edges[:, None] - bin_freqs[None, :]  # (n_mels + 2, n_bins)
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    area_norm = 2.0 / (edges[2:] - edges[:-2])
    weights = (weights.astype(np.float64) * area_norm[:, None]).astype(np.float32)
    return torch.from_numpy(weights)


class Featurizer(torch.nn.Module):
    """Waveforms ``(B, N)`` plus lengths -> batch-first features ``(B, L_max, F)`` plus lengths ``L``.

    Each utterance's spectral stages run on its own samples (no padding waste, and every BLAS/FFT call has
    the operand shapes and layouts of a batch-1 reference run); the log-mel frames are then written
    time-major into one zero-initialised buffer, where splicing is a reshape.
    """

    def __init__(self, config: FeatureConfig = FeatureConfig()):
        super().__init__()
        self.config = config
        fb = slaney_mel_filterbank(config.sample_rate, config.n_fft, config.n_mels)
        self.register_buffer("mel_fb", fb, persistent=False)
        window = torch.hann_window(config.win_length, periodic=False, dtype=torch.float32)
        self.register_buffer("window", window, persistent=False)

    def output_lengths(self, num_samples: torch.Tensor) -> torch.Tensor:
        """Feature frames per utterance: L = ceil(ceil(N / hop) / splice), int64."""
        n = torch.as_tensor(num_samples).to(torch.int64)
        hop, splice = self.config.hop_length, self.config.frame_splicing
        return torch.div(torch.div(n + hop - 1, hop, rounding_mode="floor") + splice - 1, splice,
                         rounding_mode="floor")

    def _check_lengths(self, lengths: torch.Tensor, max_samples: int) -> None:
        cfg = self.config
        if lengths.numel() == 0:
            return
        shortest = int(lengths.min())
        if int(lengths.max()) > max_samples:
            raise ValueError(f"a length ({int(lengths.max())}) exceeds the waveform width ({max_samples})")
        if shortest < cfg.min_samples:
            frames = int(self.output_lengths(torch.tensor(shortest)))
            raise DataError(
                f"audio too short: {shortest} samples ({shortest / cfg.sample_rate:.4f} s) gives {frames} "
                f"feature frame(s); at least {cfg.min_samples} samples "
                f"({cfg.min_samples / cfg.sample_rate:.4f} s) are needed")

    def _prepare(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated float32 waveforms and the lengths as a CPU int64 tensor."""
        if waveforms.dim() != 2:
            raise ValueError(f"waveforms must be (B, N), got shape {tuple(waveforms.shape)}")
        if not waveforms.is_floating_point():
            raise TypeError(f"waveforms must be floating point, got {waveforms.dtype}")
        lengths = torch.as_tensor(lengths).to(torch.int64).reshape(-1).cpu()
        if lengths.numel() != waveforms.shape[0]:
            raise ValueError(f"{lengths.numel()} lengths for a batch of {waveforms.shape[0]}")
        self._check_lengths(lengths, waveforms.shape[1])
        return waveforms.to(torch.float32), lengths

    def _preemphasis(self, x: torch.Tensor) -> torch.Tensor:
        """y[0] = x[0], y[n] = x[n] - preemph * x[n - 1] along the last dimension."""
        p = self.config.preemph
        if not p:
            return x
        return torch.cat((x[..., :1], x[..., 1:] - p * x[..., :-1]), dim=-1)

    def _power(self, x: torch.Tensor) -> torch.Tensor:
        """One pre-emphasised waveform (N,) -> power spectrum (bins, 1 + N // hop), contiguous: torch.stft
        with center=True and reflect padding, re**2 + im**2, plus dither**2 when dither > 0."""
        cfg = self.config
        pad = cfg.n_fft // 2
        padded = torch.nn.functional.pad(x.view(1, 1, -1), (pad, pad), mode="reflect").view(1, -1)
        spec = torch.stft(padded, n_fft=cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
                          window=self.window, center=False, return_complex=True)[0]
        # Written in the reference's contiguous (bins, frames) layout, with the same bits as its
        # view_as_real(spec).pow(2).sum(-1), several times faster. The layout matters: some BLAS code paths
        # round the mel matmul differently for a transposed operand.
        parts = torch.view_as_real(spec).square()
        power = (parts[..., 0] + parts[..., 1]).contiguous()
        if cfg.dither > 0:
            power.add_(cfg.dither ** 2)
        return power

    def _logmel(self, power: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Power (bins, T) -> mel energies (n_mels, T) and their guarded natural log."""
        mel = torch.matmul(self.mel_fb, power)
        return mel, torch.log(mel + self.config.log_guard)

    def _splice(self, logmels: list[torch.Tensor], out_frames: list[int]) -> torch.Tensor:
        """Log-mels (n_mels, T_i) -> spliced (B, max(out_frames), n_mels * splice), time-major.

        Output frame j of utterance i is [logmel(s*j) | ... | logmel(s*j + s - 1)] (mel-major blocks); frames
        past T_i, and frames j >= out_frames[i], are zeros (the reference's log-domain zero padding)."""
        cfg = self.config
        splice = cfg.frame_splicing
        longest = max(out_frames, default=0)
        device = self.mel_fb.device
        buf = torch.zeros(len(logmels), longest * splice, cfg.n_mels, device=device)
        for i, (logmel, frames) in enumerate(zip(logmels, out_frames)):
            k = min(logmel.shape[1], frames * splice)
            buf[i, :k] = logmel[:, :k].T
        return buf.view(len(logmels), longest, cfg.feature_dim)

    def _normalize(self, spliced: torch.Tensor, out_frames: list[int]
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Per utterance and feature: (x - mean) / (unbiased std + 1e-5) over its first L frames; frames past
        L are 0. Returns features (B, L_max, F), mean (B, F) and std + 1e-5 (B, F) (None if not normalising).

        The mean and std are reduced over a copy laid out as the reference's (features, frames) view, whose
        time stride is `splice`: float32 sums depend on the memory layout, and this one reproduces the
        reference's values bit for bit."""
        if self.config.normalize == "none":
            return spliced, None, None
        batch, longest, dim = spliced.shape
        out = torch.zeros_like(spliced)
        mean = spliced.new_empty(batch, dim)
        std = spliced.new_empty(batch, dim)
        stride = self.config.frame_splicing  # the reference reduces over a [:, :, ::splice] view
        for i, n in enumerate(out_frames):
            rows = spliced[i, :n]
            laid_out = spliced.new_empty(dim, n, stride)[:, :, 0]
            laid_out.copy_(rows.T)
            mean[i] = laid_out.mean(dim=1)
            std[i] = laid_out.std(dim=1)
            std[i] += 1e-5
            out[i, :n] = (rows - mean[i]) / std[i]
        return out, mean, std

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """waveforms (B, N) float zero-padded, lengths (B,) samples -> features (B, L_max, F) float32 with
        frames beyond each utterance's L set to 0, and L (B,) int64."""
        x, lengths = self._prepare(waveforms, lengths)
        feat_len = self.output_lengths(lengths)
        out_frames = feat_len.tolist()
        logmels = [self._logmel(self._power(self._preemphasis(x[i, :n])))[1]
                   for i, n in enumerate(lengths.tolist())]
        feats, _, _ = self._normalize(self._splice(logmels, out_frames), out_frames)
        return feats, feat_len.to(x.device)

    def stages(self, waveform_1d: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """Every intermediate of one waveform, in the reference's feature-major layout (for debugging and
        conformance tests): preemph (N,), power (bins, T), mel and logmel (n_mels, T), spliced
        (F, ceil(T / splice)), norm_mean and norm_std_plus_eps (F,) when normalising, features (F, L),
        feature_len ()."""
        x = self._as_batch1(waveform_1d)
        x, lengths = self._prepare(x, torch.tensor([x.shape[1]]))
        feat_len = int(self.output_lengths(lengths)[0])
        out = {"preemph": self._preemphasis(x[0])}
        out["power"] = self._power(out["preemph"])
        out["mel"], out["logmel"] = self._logmel(out["power"])
        all_frames = -(-out["logmel"].shape[1] // self.config.frame_splicing)
        spliced = self._splice([out["logmel"]], [all_frames])
        out["spliced"] = spliced[0].T.contiguous()
        feats, mean, std = self._normalize(spliced[:, :feat_len], [feat_len])
        if mean is not None:
            out["norm_mean"], out["norm_std_plus_eps"] = mean[0], std[0]
        out["features"] = feats[0].T.contiguous()
        out["feature_len"] = torch.tensor(feat_len)
        return out

    def _as_batch1(self, waveform_1d: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(waveform_1d, torch.Tensor):
            x = waveform_1d
        else:
            x = torch.from_numpy(np.ascontiguousarray(waveform_1d))
        if x.dim() != 1:
            raise ValueError(f"expected a 1-D waveform, got shape {tuple(x.shape)}")
        return x.to(device=self.window.device).unsqueeze(0)

    def featurize_one(self, waveform_1d: np.ndarray | torch.Tensor) -> torch.Tensor:
        """One waveform (N,) -> features (L, F)."""
        x = self._as_batch1(waveform_1d)
        feats, _ = self.forward(x, torch.tensor([x.shape[1]]))
        return feats[0]


def spec_augment(features: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator, *,
                 freq_masks: int = 2, freq_width: int = 27, time_masks: int = 2,
                 time_width_ratio: float = 0.05, n_mels: int = 80, fill: float = 0.0) -> torch.Tensor:
    """SpecAugment-style masking of batch-first features ``(B, L, F)``; returns a new tensor.

    Frequency masks: ``freq_masks`` bands per utterance, each of width uniform in [0, freq_width] mel bands
    at a uniform start; with spliced features (F = k * n_mels) the same band is masked in all k blocks.
    Time masks: ``time_masks`` spans per utterance, each of width uniform in
    [0, floor(time_width_ratio * L_i)] frames, inside the utterance's first L_i frames.
    Masked values are set to ``fill`` (0 is the mean of normalised features); frames past an utterance's
    length are left as they are. All random numbers come from ``generator`` (a CPU generator), drawn in a
    fixed order, so the result is deterministic.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be (B, L, F), got shape {tuple(features.shape)}")
    batch, max_len, dim = features.shape
    if dim % n_mels:
        raise ValueError(f"feature size {dim} is not a multiple of n_mels={n_mels}")
    device = features.device
    lengths = torch.as_tensor(lengths).to(torch.int64).reshape(-1).cpu()
    if lengths.numel() != batch or (batch and int(lengths.max()) > max_len):
        raise ValueError(f"lengths {lengths.tolist()} do not fit features of shape {tuple(features.shape)}")
    frame = torch.arange(max_len).view(1, -1)
    valid = (frame < lengths.view(-1, 1)).unsqueeze(-1)  # (B, L, 1): padding frames are never touched
    mask = torch.zeros(batch, max_len, dim, dtype=torch.bool)

    if freq_masks > 0 and freq_width > 0:
        width_cap = min(freq_width, n_mels)
        widths = (torch.rand(batch, freq_masks, generator=generator, dtype=torch.float64)
                  * (width_cap + 1)).long().clamp_(max=width_cap)
        room = n_mels - widths
        starts = (torch.rand(batch, freq_masks, generator=generator, dtype=torch.float64) * (room + 1)).long()
        starts = torch.minimum(starts, room)
        band = torch.arange(n_mels).view(1, 1, -1)
        in_band = ((band >= starts.unsqueeze(-1)) & (band < (starts + widths).unsqueeze(-1))).any(dim=1)
        mask |= in_band.repeat(1, dim // n_mels).unsqueeze(1)  # (B, 1, F), same band in every block

    if time_masks > 0 and time_width_ratio > 0:
        caps = torch.floor(lengths.to(torch.float64) * time_width_ratio).long().view(-1, 1)
        widths = (torch.rand(batch, time_masks, generator=generator, dtype=torch.float64)
                  * (caps + 1)).long()
        widths = torch.minimum(widths, caps)
        room = (lengths.view(-1, 1) - widths).clamp(min=0)
        starts = (torch.rand(batch, time_masks, generator=generator, dtype=torch.float64) * (room + 1)).long()
        starts = torch.minimum(starts, room)
        t = frame.unsqueeze(0)  # (1, 1, L)
        in_span = ((t >= starts.unsqueeze(-1)) & (t < (starts + widths).unsqueeze(-1))).any(dim=1)
        mask |= in_span.unsqueeze(-1)  # (B, L, 1)

    mask &= valid
    return features.masked_fill(mask.to(device), fill)
