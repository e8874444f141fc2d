"""Deterministic synthetic speech corpus made with espeak-ng, written as a LibriSpeech-style tree.

The corpus exists so that a small reference transducer can be trained and evaluated where no recorded
speech is available. Sentences come from WordNet's example sentences and from the ``fortune`` cookie files;
each utterance is spoken by one espeak-ng voice+variant (a "speaker") with randomised rate, pitch, pitch
range and word gap, lightly trimmed, resampled to 16 kHz, mixed with white or pink noise and peak-normalised
to a random level.

Layout (``ROOT`` is the output folder)::

    ROOT/recipe.json                              options, seed, sentence counts, versions, per-split totals
    ROOT/<split>/voices.json                      speaker id -> voice name, parameter ranges, totals
    ROOT/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt
    ROOT/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<NNNN>.flac

Splits: ``train``; ``dev``, ``test`` and ``calib`` (training voices, sentences disjoint from training and
from each other); ``test-heldout`` (voices and sentences both absent from every other split).

Determinism: espeak-ng keeps synthesiser state (glottal phase, pitch flutter, filters) from one utterance to
the next, so the same text can come out differently depending on what was spoken before. Every utterance is
therefore synthesised in a child process forked from a worker whose engine has been initialised but has never
spoken, and espeak-ng's own random generator (voice roughness, Klatt noise; seeded differently in every
process by default) is reseeded for each utterance. All random choices come from a generator seeded with
``(seed, split, index)``, so the audio is the same whatever the number of workers or the order in which they
pick up the work.

espeak-ng is GPL-3.0-or-later: it is loaded at run time from the optional ``espeakng-loader`` package
(``pip install 'asrshrink[synth]'``) and never shipped with asrshrink.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import zlib
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from math import gcd
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from asrshrink.audio.text import normalize_text
from asrshrink.errors import DataError

#: The corpus transcripts' alphabet: space, a-z and apostrophe (what character models such as MLPerf's emit).
CORPUS_LETTERS: tuple[str, ...] = (" ", *"abcdefghijklmnopqrstuvwxyz", "'")

#: Split names in the order their sentences are drawn from the shuffled sentence list.
SPLITS: tuple[str, ...] = ("test-heldout", "test", "dev", "calib", "train")

#: Chapter number of each split (utterance ids stay unique across the whole corpus).
SPLIT_CHAPTERS: dict[str, int] = {"train": 1, "dev": 2, "test": 3, "test-heldout": 4, "calib": 5}

#: Output sample rate of the corpus.
SAMPLE_RATE = 16000

#: English voices of espeak-ng 1.52 (British English is "en").
ENGLISH_VOICES: tuple[str, ...] = (
    "en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc",
)

#: Voice variants that still sound like a person talking (whispering, croaking, robotic and echo-heavy
#: variants are left out). The empty string is the voice's own default.
VARIANTS: tuple[str, ...] = (
    "",
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8",
    "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6",
    "Alex", "Andy", "Annie", "Gene", "Mike", "adam", "aunty", "belinda", "benjamin", "boris", "david",
    "edward", "linda", "max", "mike2", "paul", "quincy", "rob", "robert", "steph", "travis", "victor", "zac",
)


def build_voice_list(voices: Sequence[str] = ENGLISH_VOICES, variants: Sequence[str] = VARIANTS) -> tuple[str, ...]:
    """All ``voice+variant`` names, voice-major; the position in this tuple is the speaker id."""
    return tuple(v if not var else f"{v}+{var}" for v in voices for var in variants)


#: The fixed speaker list: speaker id ``i`` is ``VOICES[i]``.
VOICES: tuple[str, ...] = build_voice_list()

ProgressCallback = Callable[[str, int, int], None]
"""``progress(split, done, total)``, called in the calling process after each finished utterance."""


# --------------------------------------------------------------------------------------------------------
# Sentences
# --------------------------------------------------------------------------------------------------------

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNE_DIR = Path("/usr/share/games/fortunes")
_WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
#: Fortune files that hold pictures rather than prose.
_FORTUNE_SKIP = {"ascii-art"}
_INSTALL_HINT = ("install the sentence sources with `apt-get install wordnet-base fortunes fortunes-min` "
                 "or pass wordnet_files=/fortune_files= explicitly")

_QUOTED = re.compile(r'"([^"]+)"')
_OVERSTRIKE = re.compile(r".\x08")
_ATTRIBUTION = re.compile(r"^\s*--\s")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_CODE_LIKE = re.compile(r"[@/\\<>{}|=#~^]|https?:|www\.")
_HAS_VOWEL = re.compile(r"[aeiouy]")


def default_wordnet_files(folder: Path | str = WORDNET_DIR) -> list[Path]:
    """WordNet ``data.*`` files present in ``folder`` (empty when WordNet is not installed)."""
    folder = Path(folder)
    return [folder / name for name in _WORDNET_FILES if (folder / name).is_file()]


def default_fortune_files(folder: Path | str = FORTUNE_DIR) -> list[Path]:
    """Plain-text fortune files in ``folder`` (index ``.dat`` files, ``.u8`` links and pictures skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.is_symlink() and p.suffix == "" and p.name not in _FORTUNE_SKIP)


def read_wordnet_examples(paths: Iterable[Path | str]) -> list[str]:
    """Quoted example sentences from the glosses of WordNet ``data.*`` files, in file order."""
    out: list[str] = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  ") or " | " not in line:
                    continue  # licence header or a synset without a gloss
                gloss = line.split(" | ", 1)[1]
                out.extend(m.group(1).strip() for m in _QUOTED.finditer(gloss))
    return out


def split_fortune(text: str) -> list[str]:
    """Sentences of one fortune: overstrikes removed, attribution (``-- Author``) cut off, lines joined."""
    text = _OVERSTRIKE.sub("", text)
    lines: list[str] = []
    for line in text.splitlines():
        if _ATTRIBUTION.match(line):
            break
        lines.append(line.strip())
    joined = " ".join(line for line in lines if line)
    return [s.strip() for s in _SENTENCE_END.split(joined) if s.strip()]


def read_fortune_sentences(paths: Iterable[Path | str]) -> list[str]:
    """All sentences of the fortunes in ``paths`` (fortunes are separated by lines holding only ``%``)."""
    out: list[str] = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as fh:
            fortunes = re.split(r"^%\s*$", fh.read(), flags=re.MULTILINE)
        for fortune in fortunes:
            out.extend(split_fortune(fortune))
    return out


def clean_sentence(raw: str, min_words: int = 4, max_words: int = 20) -> str | None:
    """The normalised sentence if it is speakable and ``min_words``-``max_words`` words long, else None.

    Dropped: code-like text (paths, addresses, markup), text that is mostly not letters, words without a
    vowel longer than one letter (espeak-ng would spell them out) and words over 20 letters. Apostrophes at
    the edges of words (quotation marks) are removed.
    """
    if _CODE_LIKE.search(raw):
        return None
    visible = [ch for ch in raw if not ch.isspace()]
    if not visible or sum(ch.isalpha() for ch in visible) < 0.75 * len(visible):
        return None
    words = [w.strip("'") for w in normalize_text(raw, CORPUS_LETTERS).split()]
    words = [w for w in words if w]
    if not min_words <= len(words) <= max_words:
        return None
    for word in words:
        letters = word.replace("'", "")
        if len(letters) > 20 or (len(letters) > 1 and not _HAS_VOWEL.search(letters)):
            return None
    return " ".join(words)


def filter_sentences(raw: Iterable[str], min_words: int = 4, max_words: int = 20) -> list[str]:
    """Normalised, filtered (see :func:`clean_sentence`), de-duplicated and sorted sentences."""
    kept = {s for s in (clean_sentence(r, min_words, max_words) for r in raw) if s is not None}
    return sorted(kept)


@dataclass
class SentencePool:
    """Sorted unique sentences and how many each source contributed."""

    sentences: list[str]
    counts: dict[str, int]


def load_sentences(wordnet_files: Sequence[Path | str] | None = None,
                   fortune_files: Sequence[Path | str] | None = None,
                   min_words: int = 4, max_words: int = 20) -> SentencePool:
    """Read, normalise and filter the sentence sources (system locations when arguments are None).

    Raises :class:`DataError` with the installation command when no source yields any sentence.
    """
    wordnet_files = default_wordnet_files() if wordnet_files is None else list(wordnet_files)
    fortune_files = default_fortune_files() if fortune_files is None else list(fortune_files)
    missing = [str(p) for p in [*wordnet_files, *fortune_files] if not Path(p).is_file()]
    if missing:
        raise DataError(f"sentence source not found: {', '.join(missing[:3])}; {_INSTALL_HINT}")
    wordnet = filter_sentences(read_wordnet_examples(wordnet_files), min_words, max_words)
    fortune = filter_sentences(read_fortune_sentences(fortune_files), min_words, max_words)
    sentences = sorted(set(wordnet) | set(fortune))
    if not sentences:
        raise DataError(f"no usable sentences found (WordNet files: {len(wordnet_files)}, "
                        f"fortune files: {len(fortune_files)}); {_INSTALL_HINT}")
    return SentencePool(sentences, {"wordnet": len(wordnet), "fortune": len(fortune), "unique": len(sentences)})


def shuffle_sentences(sentences: Sequence[str], seed: int) -> list[str]:
    """Sorted copy of ``sentences`` put in a seeded random order."""
    ordered = sorted(sentences)
    perm = np.random.default_rng([seed, 0x5E7]).permutation(len(ordered))
    return [ordered[i] for i in perm]


# --------------------------------------------------------------------------------------------------------
# Configuration and plan
# --------------------------------------------------------------------------------------------------------

@dataclass
class SynthConfig:
    """Every option that shapes the corpus (all of it is written to ``recipe.json``)."""

    train: int = 20000
    dev: int = 300
    test: int = 300
    test_heldout: int = 300
    calib: int = 200
    seed: int = 0
    #: Fraction of the voice list held out from training (for ``test-heldout``); at least one voice.
    heldout_voice_fraction: float = 0.15
    min_words: int = 4
    max_words: int = 20
    #: Inclusive ranges of the per-utterance random draws.
    rate_wpm: tuple[int, int] = (130, 200)
    pitch: tuple[int, int] = (30, 70)
    pitch_range: tuple[int, int] = (25, 80)
    word_gap: tuple[int, int] = (0, 3)
    snr_db: tuple[float, float] = (25.0, 45.0)
    noise_types: tuple[str, ...] = ("white", "pink")
    peak_dbfs: tuple[float, float] = (-10.0, -1.0)
    pad_seconds: tuple[float, float] = (0.1, 0.2)
    #: soundfile container and sub-type, e.g. ("FLAC", "PCM_16"), ("FLAC", "PCM_S8"), ("OGG", "OPUS").
    audio_format: str = "FLAC"
    subtype: str = "PCM_16"
    #: soundfile ``compression_level`` in [0, 1] (for Opus/Vorbis: lower is higher bit rate); None = default.
    compression_level: float | None = None
    voices: tuple[str, ...] = VOICES

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.train, "dev": self.dev, "test": self.test,
                "test-heldout": self.test_heldout, "calib": self.calib}

    def extension(self) -> str:
        fmt, sub = self.audio_format.upper(), self.subtype.upper()
        if fmt == "OGG":
            return ".opus" if sub == "OPUS" else ".ogg"
        return "." + fmt.lower()

    def validate(self) -> None:
        import soundfile

        fmt, sub = self.audio_format.upper(), self.subtype.upper()
        if fmt not in soundfile.available_formats():
            raise DataError(f"unknown audio format {self.audio_format!r}; choose from "
                            f"{', '.join(sorted(soundfile.available_formats()))}")
        if sub not in soundfile.available_subtypes(fmt):
            raise DataError(f"sub-type {self.subtype!r} is not available for {fmt}; choose from "
                            f"{', '.join(sorted(soundfile.available_subtypes(fmt)))}")
        if any(n < 0 for n in self.split_sizes().values()):
            raise DataError("split sizes must not be negative")
        if not 0.0 < self.heldout_voice_fraction < 1.0:
            raise DataError("heldout_voice_fraction must be between 0 and 1")
        if len(self.voices) < 2:
            raise DataError("at least two voices are needed (one for training, one held out)")
        if not set(self.noise_types) <= {"white", "pink"}:
            raise DataError("noise_types may only contain 'white' and 'pink'")


@dataclass(frozen=True)
class Utterance:
    """One planned utterance."""

    split: str
    index: int  # position within the split; seeds the utterance's random draws
    speaker: int  # index into the voice list
    chapter: int
    utt_id: str
    voice: str
    text: str  # normalised (lower case) text that is spoken

    @property
    def transcript(self) -> str:
        return self.text.upper()

    def relative_path(self, extension: str) -> str:
        return f"{self.split}/{self.speaker}/{self.chapter}/{self.utt_id}{extension}"


def select_heldout_voices(n_voices: int, fraction: float, seed: int) -> list[int]:
    """Sorted indices of the voices held out from training (at least one, never all)."""
    count = min(n_voices - 1, max(1, round(n_voices * fraction)))
    perm = np.random.default_rng([seed, 0x4E1D]).permutation(n_voices)
    return sorted(int(i) for i in perm[:count])


def plan_corpus(config: SynthConfig, sentences: Sequence[str]) -> dict[str, list[Utterance]]:
    """Assign sentences and voices to every utterance of every split (pure: no synthesis, no I/O).

    Evaluation splits take disjoint slices of the shuffled sentence list first; ``train`` takes the rest
    and cycles through it again when it asks for more utterances than there are sentences left. Voices go
    round-robin over a seeded order of the split's voice pool, so speakers are balanced.
    """
    shuffled = shuffle_sentences(sentences, config.seed)
    sizes = config.split_sizes()
    n_eval = sum(sizes[s] for s in SPLITS if s != "train")
    if n_eval > len(shuffled) or (sizes["train"] > 0 and n_eval >= len(shuffled)):
        raise DataError(f"{len(shuffled)} sentences cannot cover {n_eval} evaluation utterances plus a "
                        "training set; ask for fewer evaluation utterances or add sentence sources")
    heldout = select_heldout_voices(len(config.voices), config.heldout_voice_fraction, config.seed)
    held = set(heldout)
    seen = [i for i in range(len(config.voices)) if i not in held]
    plan: dict[str, list[Utterance]] = {}
    cursor = 0
    for split in SPLITS:
        n = sizes[split]
        if split == "train":
            pool_sentences = shuffled[cursor:]
            texts = [pool_sentences[i % len(pool_sentences)] for i in range(n)]
        else:
            texts = shuffled[cursor:cursor + n]
            cursor += n
        pool = heldout if split == "test-heldout" else seen
        order = np.random.default_rng([config.seed, _split_code(split), 0x5BEA]).permutation(len(pool))
        utts = []
        for i, text in enumerate(texts):
            speaker = pool[int(order[i % len(pool)])]
            counter = i // len(pool)
            chapter = SPLIT_CHAPTERS[split] + 10 * (counter // 10000)
            utt_id = f"{speaker}-{chapter}-{counter % 10000:04d}"
            utts.append(Utterance(split, i, speaker, chapter, utt_id, config.voices[speaker], text))
        plan[split] = utts
    return plan


def _split_code(split: str) -> int:
    return zlib.crc32(split.encode("utf-8"))


# --------------------------------------------------------------------------------------------------------
# espeak-ng through ctypes
# --------------------------------------------------------------------------------------------------------

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE, _PARAM_WORDGAP = 1, 2, 3, 4, 7
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_CHILD_TIMEOUT_S = 120


def espeak_paths() -> tuple[str, str]:
    """(shared library, ``espeak-ng-data`` folder) from the ``espeakng-loader`` package."""
    try:
        import espeakng_loader
    except ImportError as exc:
        raise DataError("speech synthesis needs espeak-ng: `pip install 'asrshrink[synth]'` "
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
            raise DataError("espeak-ng 1.52 or newer is needed (espeak_ng_SetRandSeed makes synthesis "
                            "repeatable): `pip install -U espeakng-loader`")
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_SetRandSeed.restype = None
        parent = os.path.dirname(os.path.abspath(data_path)).encode()
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, parent, _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise DataError(f"espeak-ng failed to initialise with data in {data_path}")
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
            raise DataError(f"espeak-ng has no voice {voice!r}")
        for param, value in ((_PARAM_RATE, rate), (_PARAM_VOLUME, 100), (_PARAM_PITCH, pitch),
                             (_PARAM_RANGE, pitch_range), (_PARAM_WORDGAP, word_gap)):
            lib.espeak_SetParameter(param, int(value), 0)
        self._chunks = []
        data = text.encode("utf-8")
        if lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None) != 0:
            raise DataError(f"espeak-ng failed to synthesise {text!r} with {voice}")
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

        payload = _run_in_child(job, f"{voice!r}: {text!r}")
        if len(payload) % 2:
            raise DataError(f"espeak-ng child process returned a truncated result for {voice!r}: {text!r}")
        return np.frombuffer(payload, dtype="<i2").astype(np.int16)

    def missing_voices(self, voices: Sequence[str]) -> list[str]:
        """Names in ``voices`` that espeak-ng cannot load (checked in a forked child)."""
        def job() -> bytes:
            lib = self._lib
            bad = [v for v in voices if lib.espeak_SetVoiceByName(v.encode()) != 0]
            return "\n".join(bad).encode()

        return [v for v in _run_in_child(job, "voice check").decode().split("\n") if v]


def _run_in_child(job: Callable[[], bytes], what: str) -> bytes:
    """Run ``job`` in a forked child and return the bytes it produced (a DataError raised there is re-raised)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns, and skips the parent's clean-up handlers
        code = 0
        try:
            os.close(read_fd)
            signal.alarm(_CHILD_TIMEOUT_S)
            try:
                payload = job()
            except DataError as exc:
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
        raise DataError(payload.decode("utf-8", "replace"))
    if code != 0:
        raise DataError(f"espeak-ng child process failed (exit status {code}) for {what}")
    return payload


def espeak_version() -> str:
    """Version string of the espeak-ng library (read without initialising it)."""
    lib = ctypes.CDLL(espeak_paths()[0])
    lib.espeak_Info.argtypes = [ctypes.c_void_p]
    lib.espeak_Info.restype = ctypes.c_char_p
    return (lib.espeak_Info(None) or b"unknown").decode()


def check_voices(voices: Sequence[str] = VOICES) -> list[str]:
    """Voice names from ``voices`` that espeak-ng cannot load (empty when all load)."""
    return _engine().missing_voices(list(voices))


# --------------------------------------------------------------------------------------------------------
# Signal processing
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UtteranceParams:
    """The random draws of one utterance."""

    rate: int
    pitch: int
    pitch_range: int
    word_gap: int
    lead_s: float
    trail_s: float
    noise: str
    snr_db: float
    peak_dbfs: float
    rand_seed: int


def draw_params(config: SynthConfig, rng: np.random.Generator) -> UtteranceParams:
    """Draw an utterance's parameters (always in this order, so a seed fixes them)."""
    rate = int(rng.integers(config.rate_wpm[0], config.rate_wpm[1] + 1))
    pitch = int(rng.integers(config.pitch[0], config.pitch[1] + 1))
    pitch_range = int(rng.integers(config.pitch_range[0], config.pitch_range[1] + 1))
    word_gap = int(rng.integers(config.word_gap[0], config.word_gap[1] + 1))
    lead = float(rng.uniform(*config.pad_seconds))
    trail = float(rng.uniform(*config.pad_seconds))
    noise = str(config.noise_types[int(rng.integers(len(config.noise_types)))])
    snr = float(rng.uniform(*config.snr_db))
    peak = float(rng.uniform(*config.peak_dbfs))
    rand_seed = int(rng.integers(1, 2**31 - 1))
    return UtteranceParams(rate, pitch, pitch_range, word_gap, lead, trail, noise, snr, peak, rand_seed)


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


def make_noise(kind: str, n: int, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Unit-power white or pink (1/f power, flat below 20 Hz, no DC) noise."""
    if kind == "pink" and n > 1:
        from scipy.fft import irfft, next_fast_len, rfft, rfftfreq

        m = next_fast_len(n, real=True)  # shaped at a fast FFT length, then cut to n
        spectrum = rfft(rng.standard_normal(m))
        spectrum /= np.sqrt(np.maximum(rfftfreq(m, 1.0 / sample_rate), 20.0) / 20.0)
        spectrum[0] = 0.0
        white = irfft(spectrum, m)[:n]
    else:
        white = rng.standard_normal(n)
    power = float(np.mean(white * white)) if n else 0.0
    return white / np.sqrt(power) if power > 0 else white


@lru_cache(maxsize=4)
def _resampling_filter(up: int, down: int) -> np.ndarray:
    """The low-pass FIR that ``resample_poly`` designs by default, made once instead of per call."""
    from scipy.signal import firwin

    max_rate = max(up, down)
    return firwin(2 * 10 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0))


def render_audio(raw: np.ndarray, source_rate: int, params: UtteranceParams,
                 rng: np.random.Generator) -> np.ndarray:
    """Trim/pad silence, resample to 16 kHz, add noise, peak-normalise; float64 in [-1, 1]."""
    from scipy.signal import resample_poly

    x = raw.astype(np.float64) / 32768.0
    start, end = speech_bounds(x, source_rate)
    lead = int(round(params.lead_s * source_rate))
    trail = int(round(params.trail_s * source_rate))
    left = x[max(0, start - lead):start]
    right = x[end:end + trail]
    x = np.concatenate([np.zeros(lead - len(left)), left, x[start:end], right, np.zeros(trail - len(right))])
    g = gcd(SAMPLE_RATE, source_rate)  # 22050 Hz -> 16 kHz is up 320, down 441
    up, down = SAMPLE_RATE // g, source_rate // g
    y = resample_poly(x, up, down, window=_resampling_filter(up, down))
    # speech power over the utterance without its padding
    a = int(round(params.lead_s * SAMPLE_RATE))
    b = max(a + 1, len(y) - int(round(params.trail_s * SAMPLE_RATE)))
    power = float(np.mean(y[a:b] ** 2)) if b <= len(y) else float(np.mean(y ** 2))
    noise = make_noise(params.noise, len(y), rng)
    y = y + noise * np.sqrt(power / 10 ** (params.snr_db / 10))
    peak = float(np.max(np.abs(y))) if len(y) else 0.0
    if peak > 0:
        y *= 10 ** (params.peak_dbfs / 20) / peak
    return y


def to_pcm16(y: np.ndarray) -> np.ndarray:
    return np.clip(np.round(y * 32767.0), -32768, 32767).astype(np.int16)


def write_audio(path: Path, y: np.ndarray, config: SynthConfig) -> None:
    """Write float audio in the configured format (PCM sub-types from the rounded 16-bit samples)."""
    import soundfile

    sub = config.subtype.upper()
    data = to_pcm16(y) if sub.startswith("PCM") else y.astype(np.float32)
    tmp = path.with_name(path.name + ".part")
    kwargs = {} if config.compression_level is None else {"compression_level": config.compression_level}
    with open(tmp, "wb") as fh:  # an explicit format, since the temporary name has no audio extension
        soundfile.write(fh, data, SAMPLE_RATE, subtype=sub, format=config.audio_format.upper(), **kwargs)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------------------

_ENGINE: Espeak | None = None
_WORKER_CONFIG: SynthConfig | None = None
_WORKER_ROOT: Path | None = None


def _engine() -> Espeak:
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = Espeak()
    return _ENGINE


def _worker_init(config: SynthConfig, root: str) -> None:
    global _WORKER_CONFIG, _WORKER_ROOT
    if multiprocessing.parent_process() is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends the pool
    _WORKER_CONFIG, _WORKER_ROOT = config, Path(root)
    _engine()


def synthesize_utterance(utt: Utterance, config: SynthConfig, engine: Espeak | None = None) -> np.ndarray:
    """The final 16 kHz float audio of one planned utterance (a pure function of ``utt`` and ``config``)."""
    engine = engine or _engine()
    rng = np.random.default_rng([config.seed, _split_code(utt.split), utt.index])
    params = draw_params(config, rng)
    raw = engine.synthesize(utt.text, utt.voice, params.rate, params.pitch, params.pitch_range,
                            params.word_gap, params.rand_seed)
    if len(raw) == 0:
        raise DataError(f"espeak-ng produced no audio for {utt.utt_id} ({utt.voice}): {utt.text!r}")
    return render_audio(raw, engine.sample_rate, params, rng)


def _work(utt: Utterance) -> tuple[str, str, int]:
    assert _WORKER_CONFIG is not None and _WORKER_ROOT is not None
    y = synthesize_utterance(utt, _WORKER_CONFIG)
    path = _WORKER_ROOT / utt.relative_path(_WORKER_CONFIG.extension())
    path.parent.mkdir(parents=True, exist_ok=True)
    write_audio(path, y, _WORKER_CONFIG)
    return utt.split, utt.utt_id, len(y)


# --------------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------------

@dataclass
class SplitSummary:
    utterances: int = 0
    seconds: float = 0.0
    speakers: int = 0

    @property
    def hours(self) -> float:
        return self.seconds / 3600.0


@dataclass
class CorpusSummary:
    root: Path
    splits: dict[str, SplitSummary] = field(default_factory=dict)
    sentence_counts: dict[str, int] = field(default_factory=dict)
    heldout_voices: list[str] = field(default_factory=list)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    import scipy
    import soundfile

    versions = {"python": sys.version.split()[0], "numpy": np.__version__, "scipy": scipy.__version__,
                "soundfile": soundfile.__version__, "libsndfile": soundfile.__libsndfile_version__}
    for dist in ("asrshrink", "espeakng-loader"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = "not installed"
    versions["espeak-ng"] = _engine().version if _ENGINE is not None else espeak_version()
    return versions


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def generate_corpus(root: Path | str, config: SynthConfig | None = None, *, workers: int = 2,
                    sentences: Sequence[str] | None = None,
                    wordnet_files: Sequence[Path | str] | None = None,
                    fortune_files: Sequence[Path | str] | None = None,
                    splits: Sequence[str] | None = None, overwrite: bool = False,
                    progress: ProgressCallback | None = None) -> CorpusSummary:
    """Synthesise the corpus under ``root`` and return per-split totals.

    ``sentences`` replaces the sentence sources (it is still normalised and filtered). ``splits`` limits
    which splits are written (the plan, and so every utterance, stays the same). ``workers`` > 1 uses a
    process pool; 0 or 1 work in this process. An existing, non-empty split folder is an error unless
    ``overwrite`` is set, in which case it is deleted first.
    """
    config = config or SynthConfig()
    config.validate()
    root = Path(root)
    if sentences is not None:
        kept = filter_sentences(sentences, config.min_words, config.max_words)
        pool = SentencePool(kept, {"given": len(list(sentences)), "unique": len(kept)})
    else:
        pool = load_sentences(wordnet_files, fortune_files, config.min_words, config.max_words)
    plan = plan_corpus(config, pool.sentences)
    wanted = list(SPLITS) if splits is None else list(splits)
    unknown = [s for s in wanted if s not in SPLIT_CHAPTERS]
    if unknown:
        raise DataError(f"unknown split(s) {unknown}; choose from {', '.join(SPLIT_CHAPTERS)}")
    wanted = [s for s in SPLIT_CHAPTERS if s in wanted and plan[s]]
    for split in wanted:
        folder = root / split
        if folder.exists() and any(folder.iterdir()):
            if not overwrite:
                raise DataError(f"{folder} already holds files; choose another folder or pass overwrite")
            shutil.rmtree(folder)
    root.mkdir(parents=True, exist_ok=True)

    lengths: dict[str, int] = {}
    done = {s: 0 for s in wanted}
    totals = {s: len(plan[s]) for s in wanted}
    tasks = [u for s in wanted for u in plan[s]]
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=_worker_init, initargs=(config, str(root))) as pool_:
            for split, utt_id, n in pool_.imap_unordered(_work, tasks, chunksize=8):
                lengths[utt_id] = n
                done[split] += 1
                if progress is not None:
                    progress(split, done[split], totals[split])
    else:
        _worker_init(config, str(root))
        for utt in tasks:
            split, utt_id, n = _work(utt)
            lengths[utt_id] = n
            done[split] += 1
            if progress is not None:
                progress(split, done[split], totals[split])

    heldout = select_heldout_voices(len(config.voices), config.heldout_voice_fraction, config.seed)
    summary = CorpusSummary(root, sentence_counts=dict(pool.counts),
                            heldout_voices=[config.voices[i] for i in heldout])
    ranges = {"rate_wpm": list(config.rate_wpm), "pitch": list(config.pitch),
              "pitch_range": list(config.pitch_range), "word_gap_10ms": list(config.word_gap),
              "snr_db": list(config.snr_db), "noise_types": list(config.noise_types),
              "peak_dbfs": list(config.peak_dbfs), "pad_seconds": list(config.pad_seconds)}
    for split in wanted:
        _write_transcripts(root, plan[split])
        speakers: dict[int, dict] = {}
        for utt in plan[split]:
            entry = speakers.setdefault(utt.speaker, {
                "voice": utt.voice, "language": utt.voice.split("+")[0],
                "variant": utt.voice.split("+")[1] if "+" in utt.voice else "",
                "held_out_from_train": utt.speaker in heldout, "utterances": 0, "seconds": 0.0,
                "parameter_ranges": ranges})
            entry["utterances"] += 1
            entry["seconds"] += lengths[utt.utt_id] / SAMPLE_RATE
        for entry in speakers.values():
            entry["seconds"] = round(entry["seconds"], 3)
        _write_json(root / split / "voices.json", {str(k): speakers[k] for k in sorted(speakers)})
        seconds = sum(lengths[u.utt_id] for u in plan[split]) / SAMPLE_RATE
        summary.splits[split] = SplitSummary(len(plan[split]), seconds, len(speakers))

    train_pool = len(pool.sentences) - sum(len(plan[s]) for s in SPLITS if s != "train")
    recipe = {
        "generator": "asrshrink.audio.synth",
        "seed": config.seed,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "audio": {"sample_rate": SAMPLE_RATE, "channels": 1, "format": config.audio_format.upper(),
                  "subtype": config.subtype.upper(), "extension": config.extension()},
        "sentence_counts": {**pool.counts, "train_pool": train_pool,
                            "train_repeats": max(0, config.train - train_pool)},
        "heldout_voices": summary.heldout_voices,
        "splits": {s: {"utterances": v.utterances, "speakers": v.speakers, "hours": round(v.hours, 4)}
                   for s, v in summary.splits.items()},
        "versions": _versions(),
    }
    _merge_recipe(root / "recipe.json", recipe)
    return summary


def _write_transcripts(root: Path, utts: Sequence[Utterance]) -> None:
    groups: dict[tuple[int, int], list[Utterance]] = {}
    for utt in utts:
        groups.setdefault((utt.speaker, utt.chapter), []).append(utt)
    for (speaker, chapter), items in groups.items():
        folder = root / items[0].split / str(speaker) / str(chapter)
        folder.mkdir(parents=True, exist_ok=True)
        lines = [f"{u.utt_id} {u.transcript}\n" for u in sorted(items, key=lambda u: u.utt_id)]
        (folder / f"{speaker}-{chapter}.trans.txt").write_text("".join(lines), encoding="utf-8")


def _merge_recipe(path: Path, recipe: dict) -> None:
    """Write ``recipe.json``, keeping the per-split totals of splits written by an earlier call."""
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        if old.get("config") == recipe["config"]:
            recipe["splits"] = {**old.get("splits", {}), **recipe["splits"]}
    _write_json(path, recipe)
