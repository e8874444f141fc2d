"""What real microphones and channels do to speech, as pure functions of float64 audio at 16 kHz.

Each function takes ``x`` of shape (N,) (float64, about [-1, 1]) and returns a new array; randomness comes only
from the ``numpy.random.Generator`` passed in. :func:`draw_augmentation` draws one utterance's chain (an
:class:`Augmentation`, recorded in the manifest) and :func:`apply_augmentation` applies it, in the order a
signal meets them: speaking-rate change (speed perturbation), room (synthetic impulse response), additive
noise, channel band limits, gain, lossy codec.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from functools import lru_cache
from math import gcd

import numpy as np

SAMPLE_RATE = 16000

#: Speed factors and the (up, down) resampling ratio that gives each one (speed 0.9 = 10/9 longer).
SPEED_RATIOS: dict[float, tuple[int, int]] = {0.9: (10, 9), 0.95: (20, 19), 1.0: (1, 1), 1.05: (20, 21),
                                              1.1: (10, 11)}


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the augmentation chain (all recorded in the corpus recipe)."""

    speeds: tuple[float, ...] = (0.9, 0.95, 1.0, 1.05, 1.1)
    speed_probs: tuple[float, ...] = (0.1, 0.15, 0.5, 0.15, 0.1)
    p_reverb: float = 0.35
    rt60_s: tuple[float, float] = (0.15, 0.7)
    drr_db: tuple[float, float] = (0.0, 12.0)  # direct-to-reverberant ratio
    p_noise: float = 0.8
    noise_types: tuple[str, ...] = ("white", "pink", "brown", "hum")
    snr_db: tuple[float, float] = (10.0, 40.0)
    p_band: float = 0.25
    low_hz: tuple[float, float] = (80.0, 400.0)
    high_hz: tuple[float, float] = (3200.0, 7200.0)
    peak_dbfs: tuple[float, float] = (-30.0, -1.0)
    p_codec: float = 0.15
    codecs: tuple[str, ...] = ("opus", "mp3")
    opus_level: tuple[float, float] = (0.85, 1.0)  # libsndfile compression level: 1.0 is about 12 kbit/s
    mp3_level: tuple[float, float] = (0.5, 0.95)  # about 30-34 kbit/s at 16 kHz

    def check(self) -> None:
        if set(self.speeds) - set(SPEED_RATIOS):
            raise ValueError(f"speeds must be among {sorted(SPEED_RATIOS)}")
        if len(self.speeds) != len(self.speed_probs) or abs(sum(self.speed_probs) - 1.0) > 1e-6:
            raise ValueError("speed_probs must give one probability per speed, summing to 1")
        for name in ("p_reverb", "p_noise", "p_band", "p_codec"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability")
        if set(self.noise_types) - {"white", "pink", "brown", "hum"}:
            raise ValueError("noise_types may only hold white, pink, brown and hum")
        if set(self.codecs) - {"opus", "mp3", "vorbis"}:
            raise ValueError("codecs may only hold opus, mp3 and vorbis")


#: No augmentation at all (probabilities zero, speed 1, full-scale peak at -3 dBFS).
CLEAN = AugmentConfig(speeds=(1.0,), speed_probs=(1.0,), p_reverb=0.0, p_noise=0.0, p_band=0.0,
                      peak_dbfs=(-3.0, -3.0), p_codec=0.0)


@dataclass(frozen=True)
class Augmentation:
    """One utterance's drawn chain; ``None`` fields are steps not applied."""

    speed: float = 1.0
    rt60_s: float | None = None
    drr_db: float | None = None
    noise: str | None = None
    snr_db: float | None = None
    band_hz: tuple[float, float] | None = None
    peak_dbfs: float = -3.0
    codec: str | None = None
    codec_level: float | None = None
    seed: int = 0  # seeds the noise and impulse-response samples

    def to_json(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self).items() if v is not None}

    def label(self) -> str:
        """Short description, e.g. ``speed0.95+reverb0.4+pink17dB+band+opus``."""
        parts = [] if self.speed == 1.0 else [f"speed{self.speed:g}"]
        if self.rt60_s is not None:
            parts.append(f"reverb{self.rt60_s:.1f}")
        if self.noise is not None:
            parts.append(f"{self.noise}{self.snr_db:.0f}dB")
        if self.band_hz is not None:
            parts.append("band")
        if self.codec is not None:
            parts.append(self.codec)
        return "+".join(parts) or "clean"


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1])) if bounds[1] > bounds[0] else float(bounds[0])


def draw_augmentation(config: AugmentConfig, rng: np.random.Generator) -> Augmentation:
    """Draw a chain (always the same number of draws in the same order, so a seed fixes it)."""
    u = rng.uniform(size=4)
    speed = float(config.speeds[int(rng.choice(len(config.speeds), p=np.asarray(config.speed_probs)))])
    rt60, drr = _uniform(rng, config.rt60_s), _uniform(rng, config.drr_db)
    noise = str(config.noise_types[int(rng.integers(len(config.noise_types)))]) if config.noise_types else None
    snr = _uniform(rng, config.snr_db)
    band = (_uniform(rng, config.low_hz), _uniform(rng, config.high_hz))
    peak = _uniform(rng, config.peak_dbfs)
    codec = str(config.codecs[int(rng.integers(len(config.codecs)))]) if config.codecs else None
    level = _uniform(rng, config.opus_level if codec == "opus" else config.mp3_level)
    seed = int(rng.integers(1, 2**31 - 1))
    reverb = u[0] < config.p_reverb
    noisy = u[1] < config.p_noise and noise is not None
    banded = u[2] < config.p_band
    coded = u[3] < config.p_codec and codec is not None
    return Augmentation(speed=speed, rt60_s=rt60 if reverb else None, drr_db=drr if reverb else None,
                        noise=noise if noisy else None, snr_db=snr if noisy else None,
                        band_hz=band if banded else None, peak_dbfs=peak,
                        codec=codec if coded else None, codec_level=level if coded else None, seed=seed)


# ----------------------------------------------------------------------------------------------- steps


@lru_cache(maxsize=16)
def _resampling_filter(up: int, down: int) -> np.ndarray:
    """The low-pass FIR that ``resample_poly`` designs by default, made once instead of per call."""
    from scipy.signal import firwin

    max_rate = max(up, down)
    return firwin(2 * 10 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0))


def resample(x: np.ndarray, source_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling from ``source_rate`` to ``target_rate`` (e.g. 22050 -> 16000: up 320, down 441)."""
    from scipy.signal import resample_poly

    if source_rate == target_rate:
        return x.astype(np.float64, copy=True)
    g = gcd(target_rate, source_rate)
    up, down = target_rate // g, source_rate // g
    return resample_poly(x, up, down, window=_resampling_filter(up, down))


def change_speed(x: np.ndarray, speed: float) -> np.ndarray:
    """Speed perturbation (tempo and pitch together, as Kaldi's): ``len(out) ~ len(x) / speed``."""
    from scipy.signal import resample_poly

    up, down = SPEED_RATIOS[speed]
    if up == down:
        return x.copy()
    return resample_poly(x, up, down, window=_resampling_filter(up, down))


def speech_bounds(audio: np.ndarray, sample_rate: int, threshold_db: float = -40.0) -> tuple[int, int]:
    """(first, last+1) sample of the region whose 10 ms frames exceed ``threshold_db`` below the loudest."""
    frame = max(1, sample_rate // 100)
    n = len(audio) // frame
    if n == 0:
        return 0, len(audio)
    x = audio[: n * frame].astype(np.float64).reshape(n, frame)
    rms = np.sqrt(np.mean(x * x, axis=1))
    if rms.max() <= 0:
        return 0, len(audio)
    active = np.flatnonzero(rms > rms.max() * 10 ** (threshold_db / 20))
    return int(active[0] * frame), int(min(len(audio), (active[-1] + 1) * frame))


def trim_and_pad(x: np.ndarray, sample_rate: int, lead_s: float, trail_s: float) -> np.ndarray:
    """Cut silence to ``lead_s`` before and ``trail_s`` after the speech (zeros where there is less)."""
    start, end = speech_bounds(x, sample_rate)
    lead, trail = int(round(lead_s * sample_rate)), int(round(trail_s * sample_rate))
    left, right = x[max(0, start - lead):start], x[end:end + trail]
    return np.concatenate([np.zeros(lead - len(left)), left, x[start:end], right, np.zeros(trail - len(right))])


def make_noise(kind: str, n: int, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Unit-power noise: white, pink (1/f), brown (1/f^2; both flat below 20 Hz, no DC) or mains hum
    (50 or 60 Hz with harmonics, over a little white noise)."""
    if n == 0:
        return np.zeros(0)
    if kind == "hum":
        t = np.arange(n) / sample_rate
        f0 = 50.0 if rng.uniform() < 0.5 else 60.0
        amps = rng.uniform(0.2, 1.0, size=5) / np.arange(1, 6)
        phases = rng.uniform(0, 2 * np.pi, size=5)
        y = sum(a * np.sin(2 * np.pi * f0 * (k + 1) * t + p) for k, (a, p) in enumerate(zip(amps, phases)))
        y = y + 0.1 * rng.standard_normal(n)
    elif kind in ("pink", "brown") and n > 1:
        from scipy.fft import irfft, next_fast_len, rfft, rfftfreq

        m = next_fast_len(n, real=True)  # shaped at a fast FFT length, then cut to n
        spectrum = rfft(rng.standard_normal(m))
        ratio = np.maximum(rfftfreq(m, 1.0 / sample_rate), 20.0) / 20.0
        spectrum /= np.sqrt(ratio) if kind == "pink" else ratio
        spectrum[0] = 0.0
        y = irfft(spectrum, m)[:n]
    else:
        y = rng.standard_normal(n)
    power = float(np.mean(y * y))
    return y / np.sqrt(power) if power > 0 else y


def room_impulse_response(rt60_s: float, drr_db: float, rng: np.random.Generator,
                          sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A synthetic room impulse response: a unit direct path, a few discrete early reflections (2-20 ms) and
    an exponentially decaying noise tail (energy down 60 dB after ``rt60_s``, low-passed as air and walls
    do), scaled so the direct-to-reverberant energy ratio is ``drr_db``."""
    from scipy.signal import lfilter

    n = max(2, int(rt60_s * sample_rate))
    t = np.arange(n) / sample_rate
    tail = rng.standard_normal(n) * np.exp(-6.9078 * t / rt60_s)  # 10^(-3) amplitude = -60 dB at rt60
    onset = int(0.002 * sample_rate)
    tail[:onset] = 0.0
    for _ in range(6):  # early reflections
        k = int(rng.uniform(0.002, 0.02) * sample_rate)
        tail[k] += rng.uniform(-0.8, 0.8) * np.exp(-6.9078 * t[k] / rt60_s)
    alpha = rng.uniform(0.2, 0.6)  # one-pole low-pass
    tail = lfilter([1.0 - alpha], [1.0, -alpha], tail)
    energy = float(np.sum(tail * tail))
    if energy > 0:
        tail *= np.sqrt(10 ** (-drr_db / 10) / energy)
    tail[0] = 1.0
    return tail


def reverberate(x: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """``x`` convolved with ``rir``, cut to ``len(x)`` (the direct path stays where it was)."""
    from scipy.signal import fftconvolve

    return fftconvolve(x, rir)[: len(x)]


def add_noise(x: np.ndarray, noise: np.ndarray, snr_db: float, speech_power: float | None = None) -> np.ndarray:
    """``x + noise`` scaled to ``snr_db`` below ``speech_power`` (default: the power of ``x``)."""
    power = float(np.mean(x * x)) if speech_power is None else speech_power
    return x + noise * np.sqrt(power / 10 ** (snr_db / 10))


def band_limit(x: np.ndarray, low_hz: float, high_hz: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """4th-order Butterworth band-pass (a telephone or cheap microphone)."""
    from scipy.signal import butter, sosfilt

    sos = butter(4, [low_hz, min(high_hz, 0.49 * sample_rate)], btype="bandpass", fs=sample_rate, output="sos")
    return sosfilt(sos, x)


def set_peak(x: np.ndarray, peak_dbfs: float) -> np.ndarray:
    peak = float(np.max(np.abs(x))) if len(x) else 0.0
    return x * (10 ** (peak_dbfs / 20) / peak) if peak > 0 else x.copy()


def codec_roundtrip(x: np.ndarray, codec: str, level: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Encode and decode in memory with libsndfile (Ogg/Opus, Ogg/Vorbis or MP3) at compression ``level``;
    the result has ``len(x)`` samples (encoder delay is removed by the decoder, length is padded/cut)."""
    import soundfile

    fmt, subtype = {"opus": ("OGG", "OPUS"), "vorbis": ("OGG", "VORBIS"), "mp3": ("MP3", "MPEG_LAYER_III")}[codec]
    buf = io.BytesIO()
    soundfile.write(buf, np.clip(x, -1.0, 1.0).astype(np.float32), sample_rate, format=fmt, subtype=subtype,
                    compression_level=float(level))
    buf.seek(0)
    y, _ = soundfile.read(buf, dtype="float64")
    y = y if y.ndim == 1 else y[:, 0]
    return np.concatenate([y, np.zeros(max(0, len(x) - len(y)))])[: len(x)]


def codec_available(codec: str) -> bool:
    import soundfile

    fmt, subtype = {"opus": ("OGG", "OPUS"), "vorbis": ("OGG", "VORBIS"), "mp3": ("MP3", "MPEG_LAYER_III")}[codec]
    return fmt in soundfile.available_formats() and subtype in soundfile.available_subtypes(fmt)


def apply_augmentation(x: np.ndarray, aug: Augmentation, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Apply a drawn chain to 16 kHz float audio (deterministic given ``aug``)."""
    rng = np.random.default_rng([aug.seed, 0xA06])
    y = change_speed(x, aug.speed)
    speech_power = float(np.mean(y * y)) if len(y) else 0.0
    if aug.rt60_s is not None:
        y = reverberate(y, room_impulse_response(aug.rt60_s, aug.drr_db or 0.0, rng, sample_rate))
    if aug.noise is not None:
        y = add_noise(y, make_noise(aug.noise, len(y), rng, sample_rate), aug.snr_db, speech_power)
    if aug.band_hz is not None:
        y = band_limit(y, aug.band_hz[0], aug.band_hz[1], sample_rate)
    y = set_peak(y, aug.peak_dbfs)
    if aug.codec is not None:
        y = codec_roundtrip(y, aug.codec, aug.codec_level, sample_rate)
    return np.clip(y, -1.0, 1.0)
