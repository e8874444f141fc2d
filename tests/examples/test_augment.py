"""Augmentation of corpus v2 (pure numpy/scipy/soundfile: no synthesizer needed)."""

from __future__ import annotations

import numpy as np
import pytest

from speechcorpus.augment import (
    CLEAN, SAMPLE_RATE, AugmentConfig, Augmentation, add_noise, apply_augmentation, band_limit, change_speed,
    codec_available, codec_roundtrip, draw_augmentation, make_noise, resample, reverberate,
    room_impulse_response, set_peak, trim_and_pad,
)


def tone(freq: float, seconds: float = 1.0, rate: int = SAMPLE_RATE) -> np.ndarray:
    return 0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)


def power(x: np.ndarray) -> float:
    return float(np.mean(x * x))


def test_draws_are_fixed_by_the_seed_and_follow_the_probabilities():
    config = AugmentConfig()
    a = draw_augmentation(config, np.random.default_rng(5))
    assert a == draw_augmentation(config, np.random.default_rng(5))
    draws = [draw_augmentation(config, np.random.default_rng(i)) for i in range(2000)]
    assert abs(np.mean([d.noise is not None for d in draws]) - config.p_noise) < 0.04
    assert abs(np.mean([d.rt60_s is not None for d in draws]) - config.p_reverb) < 0.04
    assert abs(np.mean([d.codec is not None for d in draws]) - config.p_codec) < 0.03
    assert abs(np.mean([d.speed == 1.0 for d in draws]) - 0.5) < 0.04
    snrs = [d.snr_db for d in draws if d.snr_db is not None]
    assert config.snr_db[0] <= min(snrs) and max(snrs) <= config.snr_db[1]
    clean = [draw_augmentation(CLEAN, np.random.default_rng(i)) for i in range(50)]
    assert {d.label() for d in clean} == {"clean"}


def test_check_rejects_bad_options():
    with pytest.raises(ValueError, match="speeds"):
        AugmentConfig(speeds=(0.8,), speed_probs=(1.0,)).check()
    with pytest.raises(ValueError, match="probability"):
        AugmentConfig(p_noise=1.5).check()
    AugmentConfig().check()


@pytest.mark.parametrize("speed", [0.9, 0.95, 1.05, 1.1])
def test_speed_perturbation_changes_length_and_pitch(speed):
    x = tone(500.0)
    y = change_speed(x, speed)
    assert abs(len(y) - len(x) / speed) <= 2
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    peak_hz = np.argmax(spectrum) * SAMPLE_RATE / len(y)
    assert abs(peak_hz - 500.0 * speed) < 5.0


def test_resample_keeps_a_tone():
    x = 0.5 * np.sin(2 * np.pi * 440 * np.arange(22050) / 22050)
    y = resample(x, 22050)
    assert len(y) == 16000
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) - 440) <= 1


def test_room_impulse_response_has_the_asked_decay_and_direct_to_reverberant_ratio():
    rng = np.random.default_rng(0)
    h = room_impulse_response(0.5, 6.0, rng)
    assert h[0] == 1.0 and len(h) == 8000
    tail = h[1:]
    assert 10 * np.log10(1.0 / np.sum(tail**2)) == pytest.approx(6.0, abs=1e-6)
    early, late = np.sum(h[400:1200] ** 2), np.sum(h[6000:] ** 2)
    assert late < early * 1e-3  # energy decays (60 dB over 0.5 s)
    x = tone(300.0, 0.5)
    y = reverberate(x, h)
    assert len(y) == len(x) and not np.allclose(x, y)


def test_noise_is_added_at_the_asked_snr():
    rng = np.random.default_rng(1)
    x = tone(200.0)
    for kind in ("white", "pink", "brown", "hum"):
        noise = make_noise(kind, len(x), rng)
        assert power(noise) == pytest.approx(1.0)
        y = add_noise(x, noise, 12.0)
        assert 10 * np.log10(power(x) / power(y - x)) == pytest.approx(12.0, abs=1e-9)
    spectrum = np.abs(np.fft.rfft(make_noise("brown", 16000, rng))) ** 2
    assert spectrum[50:200].mean() > 100 * spectrum[4000:6000].mean()  # brown noise is low-heavy


def test_band_limit_removes_what_is_outside_the_band():
    low, mid, high = tone(50.0), tone(1000.0), tone(7000.0)
    assert power(band_limit(mid, 300.0, 3400.0)[2000:]) > 0.8 * power(mid)
    assert power(band_limit(low, 300.0, 3400.0)[2000:]) < 0.01 * power(low)
    assert power(band_limit(high, 300.0, 3400.0)[2000:]) < 0.01 * power(high)


def test_peak_and_trim():
    x = np.concatenate([np.zeros(8000), tone(300.0, 0.5), np.zeros(8000)])
    y = trim_and_pad(x, SAMPLE_RATE, 0.1, 0.2)
    assert abs(len(y) - (1600 + 8000 + 3200)) <= 160
    assert np.max(np.abs(set_peak(y, -6.0))) == pytest.approx(10 ** (-6 / 20))


@pytest.mark.parametrize("codec", ["opus", "mp3", "vorbis"])
def test_codec_roundtrip_keeps_length_and_signal(codec):
    if not codec_available(codec):
        pytest.skip(f"this libsndfile has no {codec} encoder")
    x = tone(440.0) * np.hanning(16000)
    y = codec_roundtrip(x, codec, 0.9)
    assert len(y) == len(x)
    # lossy and possibly delayed, but still the same tone: correlation at the best lag is high
    corr = np.correlate(y, x, mode="full")
    assert corr.max() / np.sqrt(np.sum(x * x) * np.sum(y * y)) > 0.8
    assert not np.allclose(x, y)


def test_apply_augmentation_is_deterministic_and_bounded():
    x = tone(300.0) + 0.1 * tone(2000.0)
    aug = Augmentation(speed=1.05, rt60_s=0.3, drr_db=3.0, noise="pink", snr_db=15.0, band_hz=(200.0, 4000.0),
                       peak_dbfs=-6.0, codec="opus" if codec_available("opus") else None, codec_level=0.9, seed=7)
    y = apply_augmentation(x, aug)
    assert np.array_equal(y, apply_augmentation(x, aug))
    assert not np.array_equal(y, apply_augmentation(x, Augmentation(**{**aug.__dict__, "seed": 8})))
    assert np.max(np.abs(y)) <= 1.0 and abs(len(y) - len(x) / 1.05) <= 2
    assert aug.label().startswith("speed1.05+reverb0.3+pink15dB+band")
    assert set(aug.to_json()) >= {"speed", "rt60_s", "noise", "snr_db", "band_hz", "seed"}
