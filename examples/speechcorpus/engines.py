"""The speech synthesizers behind corpus v2: espeak-ng (formant, in-process through ctypes), CMU flite
(diphone and clustergen, in-process through ctypes) and Festival (diphone and HTS, one ``festival`` process per
batch). Each engine turns (text, voice, its own parameters) into int16 samples at the engine's rate.

Licences (checked in ``/usr/share/doc/*/copyright`` and the wheels' metadata):

- espeak-ng 1.52 (``espeakng-loader`` wheel): GPL-3.0-or-later, code and voice data. Loaded at run time only
  to make data; never shipped with asrshrink.
- flite 2.2 (Debian ``flite``/``libflite1``): CMU's permissive licence ("free of charge, to use and distribute
  this software and its documentation without restriction"), BSD-style; voices kal, kal16 (CMU/Edinburgh
  diphones) and the CMU ARCTIC clustergen voices awb, rms, slt under the same terms.
- Festival 2.5 (Debian ``festival``): the same permissive Edinburgh/CMU licence; ``festvox-kallpc16k`` and
  ``festvox-kdlpc16k`` (kal and ked diphones, LPC) likewise; ``festvox-us-slt-hts`` BSD-3-Clause and the
  EST/HTS permissive licences.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np


class EngineError(Exception):
    """A synthesizer is missing or failed (the message says which and how to install it)."""


# --------------------------------------------------------------------------------------------------------
# Voices
# --------------------------------------------------------------------------------------------------------

#: English voices of espeak-ng 1.52 (British English is "en").
ESPEAK_LANGUAGES: tuple[str, ...] = (
    "en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc",
)

#: espeak-ng variants that still sound like a person talking (whispering, croaking, robotic and echo-heavy
#: variants are left out). The empty string is the voice's own default.
ESPEAK_VARIANTS: tuple[str, ...] = (
    "",
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8",
    "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6",
    "Alex", "Andy", "Annie", "Gene", "Mike", "adam", "aunty", "belinda", "benjamin", "boris", "david",
    "edward", "linda", "max", "mike2", "paul", "quincy", "rob", "robert", "steph", "travis", "victor", "zac",
)

#: flite voices: kal (8 kHz diphone), kal16 (16 kHz diphone), awb, rms, slt (clustergen, 16 kHz).
FLITE_VOICES: tuple[str, ...] = ("kal", "kal16", "awb", "rms", "slt")

#: Festival voices from Debian: two LPC diphone voices and one HTS voice.
FESTIVAL_VOICES: tuple[str, ...] = ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts")


@dataclass(frozen=True, order=True)
class Voice:
    """One speaker of the corpus: a synthesizer and its voice name."""

    synth: str  # "espeak-ng", "flite" or "festival"
    name: str  # e.g. "en-us+m3", "slt", "kal_diphone"

    @property
    def speaker(self) -> str:
        return f"{self.synth}:{self.name}"


def espeak_voices(languages: Sequence[str] = ESPEAK_LANGUAGES,
                  variants: Sequence[str] = ESPEAK_VARIANTS) -> tuple[Voice, ...]:
    """All ``language+variant`` espeak-ng voices, language-major."""
    return tuple(Voice("espeak-ng", lang if not var else f"{lang}+{var}") for lang in languages for var in variants)


def all_voices() -> dict[str, tuple[Voice, ...]]:
    """synth -> its voices, in a fixed order."""
    return {"espeak-ng": espeak_voices(),
            "flite": tuple(Voice("flite", v) for v in FLITE_VOICES),
            "festival": tuple(Voice("festival", v) for v in FESTIVAL_VOICES)}


LICENCES: dict[str, str] = {
    "espeak-ng": "GPL-3.0-or-later (espeak-ng 1.52 code and data, espeakng-loader wheel); not shipped",
    "flite": "CMU flite licence (permissive, BSD-style); voices kal/kal16 (diphone) and CMU ARCTIC "
             "awb/rms/slt (clustergen) under the same terms",
    "festival": "Festival/Edinburgh permissive licence (BSD-style); kal/ked LPC diphones the same; "
                "cmu_us_slt_arctic_hts BSD-3-Clause + EST/HTS permissive",
}


# --------------------------------------------------------------------------------------------------------
# Forked children (espeak-ng keeps state between utterances)
# --------------------------------------------------------------------------------------------------------

_CHILD_TIMEOUT_S = 120


class _ChildFailed(Exception):
    pass


def run_in_child(job: Callable[[], bytes], what: str) -> bytes:
    """Run ``job`` in a forked child and return the bytes it produced (an EngineError raised there is
    re-raised here)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns, and skips the parent's clean-up handlers
        code = 0
        try:
            os.close(read_fd)
            signal.alarm(_CHILD_TIMEOUT_S)
            try:
                payload = job()
            except EngineError as exc:
                payload, code = str(exc).encode(), 3
            view = memoryview(payload)
            while view:
                view = view[os.write(write_fd, view):]
        except BaseException:  # noqa: BLE001 - the child must always reach os._exit
            code = 4
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as fh:
        payload = fh.read()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 3:
        raise EngineError(payload.decode("utf-8", "replace"))
    if code != 0:
        raise EngineError(f"synthesizer child process failed (exit status {code}) for {what}")
    return payload


# --------------------------------------------------------------------------------------------------------
# espeak-ng through ctypes
# --------------------------------------------------------------------------------------------------------
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE, _PARAM_WORDGAP = 1, 2, 3, 4, 7
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def espeak_paths() -> tuple[str, str]:
    """(shared library, ``espeak-ng-data`` folder) from the ``espeakng-loader`` package."""
    try:
        import espeakng_loader
    except ImportError as exc:
        raise EngineError("speech synthesis needs espeak-ng: `pip install 'asrshrink[synth]'` "
                        "(installs espeakng-loader, GPL-3.0-or-later)") from exc
    return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()


class Espeak:
    """Handle on the process's espeak-ng engine.

    The library has process-wide state, so it is loaded and initialised once per process and shared by all
    handles. Synthesis normally runs in forked children (:meth:`synthesize`), which keeps the engine in
    this process in its just-initialised state.
    """

    _shared: dict[int, tuple[ctypes.CDLL, int, str]] = {}  # pid -> (library, sample rate, version)

    def __init__(self) -> None:
        pid = os.getpid()
        if pid not in Espeak._shared:
            Espeak._shared[pid] = self._load()
        self._lib, self.sample_rate, self.version = Espeak._shared[pid]
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)

    @staticmethod
    def _load() -> tuple[ctypes.CDLL, int, str]:
        lib_path, data_path = espeak_paths()
        lib = ctypes.CDLL(lib_path)
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.restype = ctypes.c_int
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        lib.espeak_Info.restype = ctypes.c_char_p
        if not hasattr(lib, "espeak_ng_SetRandSeed"):
            raise EngineError("espeak-ng 1.52 or newer is needed (espeak_ng_SetRandSeed makes synthesis "
                            "repeatable): `pip install -U espeakng-loader`")
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_SetRandSeed.restype = None
        parent = os.path.dirname(os.path.abspath(data_path)).encode()
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, parent, _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise EngineError(f"espeak-ng failed to initialise with data in {data_path}")
        return lib, int(rate), (lib.espeak_Info(None) or b"?").decode()

    def _collect(self, wav, n: int, _events) -> int:
        if n > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def synthesize_here(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int,
                        word_gap: int, rand_seed: int = 1) -> np.ndarray:
        """int16 samples at :attr:`sample_rate`, synthesised in this process (depends on earlier calls).

        ``rand_seed`` seeds espeak-ng's own generator (voice roughness, Klatt noise), which otherwise
        starts from a different value in every process.
        """
        lib = self._lib
        lib.espeak_SetSynthCallback(self._callback)
        lib.espeak_ng_SetRandSeed(int(rand_seed))
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise EngineError(f"espeak-ng has no voice {voice!r}")
        for param, value in ((_PARAM_RATE, rate), (_PARAM_VOLUME, 100), (_PARAM_PITCH, pitch),
                             (_PARAM_RANGE, pitch_range), (_PARAM_WORDGAP, word_gap)):
            lib.espeak_SetParameter(param, int(value), 0)
        self._chunks = []
        data = text.encode("utf-8")
        if lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None) != 0:
            raise EngineError(f"espeak-ng failed to synthesise {text!r} with {voice}")
        lib.espeak_Synchronize()
        chunks, self._chunks = self._chunks, []
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)

    def synthesize(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int,
                   word_gap: int, rand_seed: int = 1) -> np.ndarray:
        """Like :meth:`synthesize_here`, but in a forked child so that this process's engine never speaks.

        The result depends only on the arguments (espeak-ng would otherwise carry state over from the
        previous utterance). Costs a fork per call (about 10-20 ms).
        """
        def job() -> bytes:
            audio = self.synthesize_here(text, voice, rate, pitch, pitch_range, word_gap, rand_seed)
            return audio.astype("<i2").tobytes()

        payload = run_in_child(job, f"{voice!r}: {text!r}")
        if len(payload) % 2:
            raise EngineError(f"espeak-ng child process returned a truncated result for {voice!r}: {text!r}")
        return np.frombuffer(payload, dtype="<i2").astype(np.int16)

    def missing_voices(self, voices: Sequence[str]) -> list[str]:
        """Names in ``voices`` that espeak-ng cannot load (checked in a forked child)."""
        def job() -> bytes:
            lib = self._lib
            bad = [v for v in voices if lib.espeak_SetVoiceByName(v.encode()) != 0]
            return "\n".join(bad).encode()

        return [v for v in run_in_child(job, "voice check").decode().split("\n") if v]


def espeak_version() -> str:
    """Version string of the espeak-ng library (read without initialising it)."""
    lib = ctypes.CDLL(espeak_paths()[0])
    lib.espeak_Info.argtypes = [ctypes.c_void_p]
    lib.espeak_Info.restype = ctypes.c_char_p
    return (lib.espeak_Info(None) or b"unknown").decode()


# --------------------------------------------------------------------------------------------------------
# flite through ctypes
# --------------------------------------------------------------------------------------------------------

_FLITE_LIBDIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib", "/usr/local/lib")


class _FliteWave(ctypes.Structure):
    _fields_ = [("type", ctypes.c_char_p), ("sample_rate", ctypes.c_int), ("num_samples", ctypes.c_int),
                ("num_channels", ctypes.c_int), ("samples", ctypes.POINTER(ctypes.c_short))]


class _FliteVoice(ctypes.Structure):  # the first fields of cst_voice (flite 2.x)
    _fields_ = [("name", ctypes.c_char_p), ("features", ctypes.c_void_p), ("ffunctions", ctypes.c_void_p)]


def _find_flite_lib(stem: str) -> str:
    for folder in _FLITE_LIBDIRS:
        for suffix in (".so.1", ".so"):
            path = Path(folder) / f"{stem}{suffix}"
            if path.exists():
                return str(path)
    raise EngineError(f"flite library {stem} not found; `apt-get install flite` (Debian libflite1)")


class Flite:
    """CMU flite 2.x driven in-process through ctypes (Debian's ``libflite1``).

    flite keeps no state between utterances that changes the audio, so no fork is needed. Per-utterance
    parameters: ``duration_stretch`` (speaking rate) and, for the diphone voices, the target F0 mean.
    """

    _shared: dict[int, "Flite"] = {}

    def __new__(cls):
        pid = os.getpid()
        if pid not in cls._shared:
            self = super().__new__(cls)
            self._load()
            cls._shared[pid] = self
        return cls._shared[pid]

    def _load(self) -> None:
        mode = ctypes.RTLD_GLOBAL
        self._lib = lib = ctypes.CDLL(_find_flite_lib("libflite"), mode=mode)
        for stem in ("libflite_usenglish", "libflite_cmulex"):
            ctypes.CDLL(_find_flite_lib(stem), mode=mode)
        lib.flite_init()
        self._libc = ctypes.CDLL(None)
        self._libc.srand.argtypes = [ctypes.c_uint]
        lib.flite_text_to_wave.restype = ctypes.POINTER(_FliteWave)
        lib.flite_text_to_wave.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
        lib.feat_set_float.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_float]
        lib.delete_wave.argtypes = [ctypes.c_void_p]
        lib.feat_float.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.feat_float.restype = ctypes.c_float
        lib.feat_present.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.feat_present.restype = ctypes.c_int
        self._voices: dict[str, ctypes.POINTER(_FliteVoice)] = {}
        self._default_f0: dict[str, float] = {}
        self.version = "2.2"

    def _voice(self, name: str):
        if name not in self._voices:
            if name not in FLITE_VOICES:
                raise EngineError(f"flite has no voice {name!r}; choose from {', '.join(FLITE_VOICES)}")
            vlib = ctypes.CDLL(_find_flite_lib(f"libflite_cmu_us_{name}"), mode=ctypes.RTLD_GLOBAL)
            register = getattr(vlib, f"register_cmu_us_{name}")
            register.restype = ctypes.POINTER(_FliteVoice)
            register.argtypes = [ctypes.c_char_p]
            voice = register(None)
            features = voice.contents.features
            present = self._lib.feat_present(features, b"int_f0_target_mean")
            self._default_f0[name] = float(self._lib.feat_float(features, b"int_f0_target_mean")) if present \
                else 100.0
            self._voices[name] = voice
        return self._voices[name]

    def default_f0(self, voice: str) -> float:
        """The voice's own target F0 mean (Hz)."""
        self._voice(voice)
        return self._default_f0[voice]

    def synthesize(self, text: str, voice: str, duration_stretch: float = 1.0,
                   f0_mean: float | None = None, rand_seed: int = 1) -> tuple[np.ndarray, int]:
        """(int16 samples, sample rate) of ``text`` spoken by ``voice``.

        ``rand_seed`` seeds the C library's ``rand()``, which the clustergen voices draw their excitation
        noise from (without it the same call gives different audio each time).
        """
        v = self._voice(voice)
        self._libc.srand(int(rand_seed) & 0x7FFFFFFF)
        features = v.contents.features
        self._lib.feat_set_float(features, b"duration_stretch", float(duration_stretch))
        # always set (features stay on the voice from one call to the next)
        f0 = self._default_f0[voice] if f0_mean is None else f0_mean
        self._lib.feat_set_float(features, b"int_f0_target_mean", float(f0))
        wave = self._lib.flite_text_to_wave(text.encode("utf-8"), ctypes.cast(v, ctypes.c_void_p))
        if not wave:
            raise EngineError(f"flite failed on {text!r} with {voice}")
        w = wave.contents
        samples = np.ctypeslib.as_array(w.samples, shape=(w.num_samples,)).copy() if w.num_samples else \
            np.zeros(0, dtype=np.int16)
        rate = int(w.sample_rate)
        self._lib.delete_wave(wave)
        return samples.astype(np.int16), rate


def flite_available() -> bool:
    try:
        _find_flite_lib("libflite")
        return True
    except EngineError:
        return False


# --------------------------------------------------------------------------------------------------------
# Festival, one process per batch
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FestivalRequest:
    text: str  # normalised text (a-z, apostrophe, space), so it needs no quoting
    voice: str  # one of FESTIVAL_VOICES
    duration_stretch: float = 1.0
    f0_mean: float | None = None  # diphone voices only (their intonation model's target mean)


def festival_available() -> bool:
    return shutil.which("festival") is not None


def festival_batch(requests: Sequence[FestivalRequest], timeout_s: float = 600.0) -> list[tuple[np.ndarray, int]]:
    """Synthesize a batch in one ``festival --pipe`` process; (int16 samples, rate) per request, in order.

    One process per batch avoids Festival's start-up per utterance (about 0.3 s) and its block-buffered
    output when used interactively. Each utterance sets its own voice and parameters, so the result does not
    depend on the batch it is in.
    """
    import soundfile

    exe = shutil.which("festival")
    if exe is None:
        raise EngineError("Festival is not installed; `apt-get install festival festvox-kallpc16k "
                          "festvox-kdlpc16k festvox-us-slt-hts`")
    for r in requests:
        if r.voice not in FESTIVAL_VOICES:
            raise EngineError(f"Festival voice {r.voice!r} unknown; choose from {', '.join(FESTIVAL_VOICES)}")
        if not set(r.text) <= set("abcdefghijklmnopqrstuvwxyz' "):
            raise EngineError(f"Festival text must be normalised: {r.text!r}")
    with tempfile.TemporaryDirectory(prefix="festival-") as tmp:
        lines = []
        for i, r in enumerate(requests):
            lines.append(f"(voice_{r.voice})")
            lines.append(f"(Parameter.set 'Duration_Stretch {r.duration_stretch:.4f})")
            if r.f0_mean is not None and r.voice.endswith("_diphone"):
                lines.append(f"(set! int_lr_params (list (list 'target_f0_mean {r.f0_mean:.1f}) "
                             "(list 'target_f0_std 15) (list 'model_f0_mean 170) (list 'model_f0_std 34)))")
            lines.append(f'(utt.save.wave (utt.synth (Utterance Text "{r.text}")) "{tmp}/{i}.wav" (quote riff))')
        try:
            proc = subprocess.run([exe, "--pipe"], input="\n".join(lines) + "\n", text=True,
                                  capture_output=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise EngineError(f"Festival timed out on a batch of {len(requests)}") from exc
        out = []
        for i, r in enumerate(requests):
            path = Path(tmp) / f"{i}.wav"
            if not path.is_file():
                raise EngineError(f"Festival wrote no audio for {r.text!r} ({r.voice}); exit status "
                                  f"{proc.returncode}: {proc.stderr.strip()[-300:]}")
            audio, rate = soundfile.read(path, dtype="int16")
            out.append((audio if audio.ndim == 1 else audio[:, 0], int(rate)))
    return out


def festival_version() -> str:
    exe = shutil.which("festival")
    if exe is None:
        return "not installed"
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True)
    return (proc.stdout or proc.stderr).strip().splitlines()[0] if (proc.stdout or proc.stderr) else "?"
