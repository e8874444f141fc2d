"""Corpus v2: plan (who says what in which split) and generation (synthesis, augmentation, files, manifests).

Layout (``ROOT`` is the output folder)::

    ROOT/recipe.json                                  config, seed, sentence pools, voices, per-split figures,
                                                      licences, versions, generation time
    ROOT/<split>/manifest.jsonl                       one JSON object per utterance (NeMo convention):
                                                      audio_filepath (relative to the split folder), text,
                                                      duration, plus synth, voice, source, augment
    ROOT/<split>/audio/<NNN>/<split>-<NNNNNN>.flac    16 kHz mono, 16-bit FLAC

``asrshrink eval --data ROOT/<split>`` and ``examples/train_reference.py --corpus ROOT`` read a split folder
directly (its one manifest). Splits:

- ``train``: training synthesizers' seen voices, training sources' sentences;
- ``dev``, ``test``, ``calib``: the same voices, sentences never in training (and disjoint from each other);
- ``test-unseen``: voices held out of training (espeak-ng voice variants and flite voices) AND unseen sentences;
- ``test-heldout-synth``: a synthesizer never in training (default Festival: its kal and ked diphone voices and
  its HTS voice), unseen sentences from the training sources;
- ``test-heldout-source``: seen voices reading a sentence source never in training (default WordNet glosses).

Determinism: every random choice comes from a generator seeded with ``(seed, split, index)`` and every engine
is made repeatable (espeak-ng in a forked child with its generator reseeded; flite with the C library's
``rand()`` reseeded; Festival from a fresh process per batch), so the same options give the same files whatever
``workers`` is.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .augment import SAMPLE_RATE, AugmentConfig, apply_augmentation, draw_augmentation, resample, trim_and_pad
from .engines import (
    LICENCES, EngineError, Espeak, FestivalRequest, Flite, Voice, all_voices, espeak_version, festival_batch,
    festival_version,
)
from .sources import SOURCES, load_sources

#: Split names; evaluation splits take their sentences first, in this order.
SPLITS: tuple[str, ...] = ("test-unseen", "test-heldout-synth", "test", "dev", "calib", "test-heldout-source",
                           "train")
EVAL_SPLITS = tuple(s for s in SPLITS if s != "train")

ProgressCallback = Callable[[str, int, int], None]
"""``progress(split, done, total)``, called in the calling process as utterances finish."""


class CorpusError(Exception):
    """A user-fixable problem with the options or the environment (one line)."""


@dataclass(frozen=True)
class CorpusConfig:
    """Every option that shapes corpus v2 (all of it goes into ``recipe.json``)."""

    train: int = 30000
    dev: int = 400
    test: int = 400
    calib: int = 200
    test_unseen: int = 600
    test_heldout_synth: int = 400
    test_heldout_source: int = 400
    seed: int = 0
    #: Sentence sources of train/dev/test/calib/test-unseen/test-heldout-synth, and how often each is drawn.
    train_sources: tuple[str, ...] = ("wordnet-examples", "fortunes", "kjv", "jargon", "gcide", "devil")
    source_weights: tuple[float, ...] = (0.25, 0.25, 0.25, 0.1, 0.08, 0.07)
    heldout_source: str = "wordnet-glosses"
    #: Synthesizers heard in training and their shares of the utterances (also of test-unseen).
    train_synths: tuple[str, ...] = ("espeak-ng", "flite")
    synth_weights: tuple[float, ...] = (0.6, 0.4)
    heldout_synth: str = "festival"
    #: espeak-ng voice+variant names held out of training: this fraction of them, drawn from the seed.
    heldout_espeak_fraction: float = 0.15
    heldout_flite_voices: tuple[str, ...] = ("rms",)
    min_words: int = 4
    max_words: int = 20
    #: espeak-ng parameter ranges (inclusive).
    rate_wpm: tuple[int, int] = (130, 200)
    pitch: tuple[int, int] = (30, 70)
    pitch_range: tuple[int, int] = (25, 80)
    word_gap: tuple[int, int] = (0, 3)
    #: flite and Festival: duration stretch, and F0 target as a factor of the voice's own mean.
    duration_stretch: tuple[float, float] = (0.85, 1.2)
    f0_factor: tuple[float, float] = (0.8, 1.3)
    pad_seconds: tuple[float, float] = (0.1, 0.25)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    audio_format: str = "FLAC"
    subtype: str = "PCM_16"

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.train, "dev": self.dev, "test": self.test, "calib": self.calib,
                "test-unseen": self.test_unseen, "test-heldout-synth": self.test_heldout_synth,
                "test-heldout-source": self.test_heldout_source}

    def extension(self) -> str:
        return ".opus" if self.subtype.upper() == "OPUS" else ".ogg" if self.audio_format.upper() == "OGG" \
            else "." + self.audio_format.lower()

    def check(self) -> None:
        import soundfile

        if any(n < 0 for n in self.split_sizes().values()):
            raise CorpusError("split sizes must not be negative")
        if len(self.train_sources) != len(self.source_weights) or min(self.source_weights, default=0) <= 0:
            raise CorpusError("give one positive weight per training sentence source")
        if self.heldout_source in self.train_sources:
            raise CorpusError(f"the held-out source {self.heldout_source} is also a training source")
        unknown = [s for s in (*self.train_sources, self.heldout_source) if s not in SOURCES]
        if unknown:
            raise CorpusError(f"unknown sentence source(s) {unknown}; known: {', '.join(SOURCES)}")
        synths = all_voices()
        if len(self.train_synths) != len(self.synth_weights) or min(self.synth_weights, default=0) <= 0:
            raise CorpusError("give one positive weight per training synthesizer")
        if set(self.train_synths) - set(synths) or self.heldout_synth not in synths:
            raise CorpusError(f"synthesizers must be among {', '.join(synths)}")
        if self.heldout_synth in self.train_synths:
            raise CorpusError(f"the held-out synthesizer {self.heldout_synth} is also a training synthesizer")
        if not 0.0 < self.heldout_espeak_fraction < 1.0:
            raise CorpusError("heldout_espeak_fraction must be between 0 and 1")
        flite = {v.name for v in synths["flite"]}
        if set(self.heldout_flite_voices) - flite or set(self.heldout_flite_voices) >= flite:
            raise CorpusError(f"held-out flite voices must be some, not all, of {', '.join(sorted(flite))}")
        try:
            self.augment.check()
        except ValueError as exc:
            raise CorpusError(f"augmentation: {exc}") from exc
        fmt, sub = self.audio_format.upper(), self.subtype.upper()
        if fmt not in soundfile.available_formats() or sub not in soundfile.available_subtypes(fmt):
            raise CorpusError(f"audio format {fmt}/{sub} is not available in this libsndfile")

    def to_json(self) -> dict:
        def plain(v):
            if isinstance(v, tuple):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v
        return plain(asdict(self))


# --------------------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Utterance:
    """One planned utterance."""

    split: str
    index: int  # position within the split; seeds its random draws
    voice: Voice
    source: str
    text: str  # normalised, lower case

    @property
    def utt_id(self) -> str:
        return f"{self.split}-{self.index:06d}"

    def relative_path(self, extension: str) -> str:
        """Audio path relative to the split folder."""
        return f"audio/{self.index // 1000:03d}/{self.utt_id}{extension}"


def split_code(split: str) -> int:
    return zlib.crc32(split.encode("utf-8"))


def voice_pools(config: CorpusConfig) -> dict[str, dict[str, list[Voice]]]:
    """``{"seen": {synth: voices}, "unseen": {synth: voices}, "heldout-synth": {synth: voices}}``."""
    voices = all_voices()
    espeak = list(voices["espeak-ng"])
    count = min(len(espeak) - 1, max(1, round(len(espeak) * config.heldout_espeak_fraction)))
    perm = np.random.default_rng([config.seed, 0x4E1D]).permutation(len(espeak))
    held_espeak = {espeak[int(i)] for i in perm[:count]}
    held = held_espeak | {v for v in voices["flite"] if v.name in config.heldout_flite_voices}
    seen = {s: [v for v in voices[s] if v not in held] for s in config.train_synths}
    unseen = {s: [v for v in voices[s] if v in held] for s in config.train_synths}
    return {"seen": seen, "unseen": {s: v for s, v in unseen.items() if v},
            "heldout-synth": {config.heldout_synth: list(voices[config.heldout_synth])}}


def _shuffled(sentences: Sequence[str], seed: int, salt: int) -> list[str]:
    ordered = sorted(sentences)
    perm = np.random.default_rng([seed, 0x5E7, salt]).permutation(len(ordered))
    return [ordered[i] for i in perm]


def _assign_voices(n: int, pools: dict[str, list[Voice]], weights: dict[str, float],
                   rng: np.random.Generator) -> list[Voice]:
    """Synthesizer by weight (in exact proportion, in a seeded order), then voices round-robin per synth."""
    synths = list(pools)
    w = np.array([weights.get(s, 1.0) for s in synths], dtype=np.float64)
    counts = np.floor(n * w / w.sum()).astype(int)
    for k in np.argsort(-(n * w / w.sum() - counts), kind="stable")[: n - counts.sum()]:
        counts[k] += 1
    labels = np.repeat(np.arange(len(synths)), counts)
    labels = labels[rng.permutation(len(labels))]
    orders = {s: rng.permutation(len(pools[s])) for s in synths}
    used = {s: 0 for s in synths}
    out = []
    for k in labels:
        s = synths[int(k)]
        out.append(pools[s][int(orders[s][used[s] % len(pools[s])])])
        used[s] += 1
    return out


def plan_corpus(config: CorpusConfig, sentences: dict[str, Sequence[str]]) -> dict[str, list[Utterance]]:
    """Assign a voice, source and sentence to every utterance of every split (pure: no synthesis, no I/O).

    ``sentences`` maps each source name to its sentences. Evaluation splits take unused sentences first (in
    ``SPLITS`` order), each utterance's source drawn by ``source_weights``; ``train`` draws from what is left
    of each training source, cycling through a source's remainder when it runs out. A held-out-source sentence
    that also occurs in a training source is dropped from the training pool.
    """
    sizes = config.split_sizes()
    weights = np.asarray(config.source_weights, dtype=np.float64)
    weights = weights / weights.sum()
    heldout_text = set(sentences.get(config.heldout_source, ()))
    pools = {s: [t for t in _shuffled(sentences[s], config.seed, i) if t not in heldout_text]
             for i, s in enumerate(config.train_sources)}
    cursors = {s: 0 for s in config.train_sources}
    held_pool = _shuffled(sentences.get(config.heldout_source, ()), config.seed, 0x401D)
    held_cursor = 0
    voices = voice_pools(config)
    synth_w = dict(zip(config.train_synths, config.synth_weights))
    plan: dict[str, list[Utterance]] = {}
    for split in SPLITS:
        n = sizes[split]
        rng = np.random.default_rng([config.seed, split_code(split), 0x5BEA])
        if split == "test-heldout-source":
            if n > len(held_pool):
                raise CorpusError(f"{config.heldout_source} has {len(held_pool)} sentences, fewer than the "
                                  f"{n} asked for")
            texts = [(config.heldout_source, t) for t in held_pool[held_cursor:held_cursor + n]]
            held_cursor += n
        else:
            picks = rng.choice(len(config.train_sources), size=n, p=weights)
            texts = []
            drawn = {src: 0 for src in config.train_sources}
            for k in picks:
                source = config.train_sources[int(k)]
                pool, c = pools[source], cursors[source]
                if split == "train":
                    remainder = len(pool) - c
                    if remainder <= 0:
                        raise CorpusError(f"source {source} has no sentences left for training")
                    texts.append((source, pool[c + drawn[source] % remainder]))
                    drawn[source] += 1
                else:
                    if c >= len(pool):
                        raise CorpusError(f"source {source} ran out of sentences for {split}; ask for fewer "
                                          "evaluation utterances")
                    texts.append((source, pool[c]))
                    cursors[source] = c + 1
        group = "heldout-synth" if split == "test-heldout-synth" else "unseen" if split == "test-unseen" \
            else "seen"
        assigned = _assign_voices(n, voices[group], synth_w, rng)
        plan[split] = [Utterance(split, i, v, src, t) for i, (v, (src, t)) in enumerate(zip(assigned, texts))]
    return plan


# --------------------------------------------------------------------------------------------------------
# One utterance
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineParams:
    """The per-utterance synthesizer draws (every field is drawn for every utterance, in this order)."""

    rate: int
    pitch: int
    pitch_range: int
    word_gap: int
    duration_stretch: float
    f0_factor: float
    lead_s: float
    trail_s: float
    rand_seed: int


def draw_params(config: CorpusConfig, rng: np.random.Generator) -> EngineParams:
    return EngineParams(
        rate=int(rng.integers(config.rate_wpm[0], config.rate_wpm[1] + 1)),
        pitch=int(rng.integers(config.pitch[0], config.pitch[1] + 1)),
        pitch_range=int(rng.integers(config.pitch_range[0], config.pitch_range[1] + 1)),
        word_gap=int(rng.integers(config.word_gap[0], config.word_gap[1] + 1)),
        duration_stretch=float(rng.uniform(*config.duration_stretch)),
        f0_factor=float(rng.uniform(*config.f0_factor)),
        lead_s=float(rng.uniform(*config.pad_seconds)),
        trail_s=float(rng.uniform(*config.pad_seconds)),
        rand_seed=int(rng.integers(1, 2**31 - 1)),
    )


def utterance_rng(config: CorpusConfig, utt: Utterance) -> np.random.Generator:
    return np.random.default_rng([config.seed, split_code(utt.split), utt.index])


_FESTIVAL_F0 = {"kal_diphone": 105.0, "ked_diphone": 105.0}


def synthesize_raw(utts: Sequence[Utterance], config: CorpusConfig) -> list[tuple[np.ndarray, int]]:
    """Raw engine output (int16 samples, rate) of each utterance; Festival utterances go in one batch."""
    out: list[tuple[np.ndarray, int] | None] = [None] * len(utts)
    festival: list[int] = []
    params = [draw_params(config, utterance_rng(config, u)) for u in utts]
    for i, (u, p) in enumerate(zip(utts, params)):
        if u.voice.synth == "espeak-ng":
            engine = Espeak()
            out[i] = (engine.synthesize(u.text, u.voice.name, p.rate, p.pitch, p.pitch_range, p.word_gap,
                                        p.rand_seed), engine.sample_rate)
        elif u.voice.synth == "flite":
            flite = Flite()
            out[i] = flite.synthesize(u.text, u.voice.name, p.duration_stretch,
                                      flite.default_f0(u.voice.name) * p.f0_factor, p.rand_seed)
        elif u.voice.synth == "festival":
            festival.append(i)
        else:
            raise EngineError(f"unknown synthesizer {u.voice.synth}")
    if festival:
        requests = []
        for i in festival:
            u, p = utts[i], params[i]
            f0 = _FESTIVAL_F0.get(u.voice.name)
            requests.append(FestivalRequest(u.text, u.voice.name, p.duration_stretch,
                                            None if f0 is None else f0 * p.f0_factor))
        for i, result in zip(festival, festival_batch(requests)):
            out[i] = result
    for u, result in zip(utts, out):
        if result is None or len(result[0]) == 0:
            raise EngineError(f"{u.voice.speaker} produced no audio for {u.utt_id}: {u.text!r}")
    return out  # type: ignore[return-value]


def render(raw: np.ndarray, rate: int, utt: Utterance, config: CorpusConfig,
           augment: bool = True) -> tuple[np.ndarray, dict]:
    """Final 16 kHz float audio of an utterance from its raw engine output, and its augmentation record."""
    rng = utterance_rng(config, utt)
    params = draw_params(config, rng)  # the same draws as in synthesize_raw, so the augmentation draws follow
    aug = draw_augmentation(config.augment, rng)
    x = trim_and_pad(raw.astype(np.float64) / 32768.0, rate, params.lead_s, params.trail_s)
    y = resample(x, rate, SAMPLE_RATE)
    if augment:
        y = apply_augmentation(y, aug)
        record = {"label": aug.label(), **aug.to_json()}
    else:
        from .augment import set_peak
        y = set_peak(y, -3.0)
        record = {"label": "clean"}
    return y, record


def write_audio(path: Path, y: np.ndarray, config: CorpusConfig) -> None:
    import soundfile

    sub = config.subtype.upper()
    data = np.clip(np.round(y * 32767.0), -32768, 32767).astype(np.int16) if sub.startswith("PCM") \
        else y.astype(np.float32)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as fh:  # an explicit format: the temporary name has no audio extension
        soundfile.write(fh, data, SAMPLE_RATE, subtype=sub, format=config.audio_format.upper())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _worker_init(config: CorpusConfig, root: str, augment_splits: tuple[str, ...], resume: bool) -> None:
    if multiprocessing.parent_process() is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends the pool
    _WORKER.update(config=config, root=Path(root), augment_splits=set(augment_splits), resume=resume)


def _work(chunk: Sequence[Utterance]) -> list[tuple[str, str, int, dict]]:
    """Synthesize, augment and write one chunk; (split, id, samples, augmentation record) per utterance."""
    import soundfile

    config: CorpusConfig = _WORKER["config"]
    root: Path = _WORKER["root"]
    results: list[tuple[str, str, int, dict] | None] = [None] * len(chunk)
    todo = []
    for i, u in enumerate(chunk):
        path = root / u.split / u.relative_path(config.extension())
        if _WORKER["resume"] and path.is_file():
            rng = utterance_rng(config, u)
            draw_params(config, rng)
            aug = draw_augmentation(config.augment, rng)
            record = {"label": aug.label(), **aug.to_json()} if u.split in _WORKER["augment_splits"] \
                else {"label": "clean"}
            results[i] = (u.split, u.utt_id, soundfile.info(str(path)).frames, record)
        else:
            todo.append(i)
    if todo:
        raws = synthesize_raw([chunk[i] for i in todo], config)
        for i, (raw, rate) in zip(todo, raws):
            u = chunk[i]
            y, record = render(raw, rate, u, config, augment=u.split in _WORKER["augment_splits"])
            path = root / u.split / u.relative_path(config.extension())
            path.parent.mkdir(parents=True, exist_ok=True)
            write_audio(path, y, config)
            results[i] = (u.split, u.utt_id, len(y), record)
    return results  # type: ignore[return-value]


def make_chunks(plan: dict[str, list[Utterance]], splits: Iterable[str], size: int = 8,
                festival_size: int = 16) -> list[list[Utterance]]:
    """Work units: consecutive utterances of a split; Festival's grouped into larger batches (one process
    each). Chunks depend only on the plan, never on the number of workers."""
    chunks: list[list[Utterance]] = []
    for split in splits:
        fest = [u for u in plan[split] if u.voice.synth == "festival"]
        other = [u for u in plan[split] if u.voice.synth != "festival"]
        chunks += [other[i:i + size] for i in range(0, len(other), size)]
        chunks += [fest[i:i + festival_size] for i in range(0, len(fest), festival_size)]
    return chunks


# --------------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------------

@dataclass
class SplitSummary:
    utterances: int = 0
    seconds: float = 0.0
    by_synth: dict[str, float] = field(default_factory=dict)  # synth -> seconds
    by_voice: dict[str, int] = field(default_factory=dict)  # speaker -> utterances
    by_source: dict[str, int] = field(default_factory=dict)  # source -> utterances

    @property
    def hours(self) -> float:
        return self.seconds / 3600.0

    def to_json(self) -> dict:
        return {"utterances": self.utterances, "hours": round(self.hours, 4), "speakers": len(self.by_voice),
                "hours_by_synth": {k: round(v / 3600, 4) for k, v in sorted(self.by_synth.items())},
                "utterances_by_voice": dict(sorted(self.by_voice.items())),
                "utterances_by_source": dict(sorted(self.by_source.items()))}


@dataclass
class CorpusSummary:
    root: Path
    splits: dict[str, SplitSummary] = field(default_factory=dict)
    sentence_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def versions() -> dict[str, str]:
    import importlib.metadata as md

    import scipy
    import soundfile

    out = {"python": sys.version.split()[0], "numpy": np.__version__, "scipy": scipy.__version__,
           "soundfile": soundfile.__version__, "libsndfile": soundfile.__libsndfile_version__}
    for dist in ("asrshrink", "espeakng-loader"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    try:
        out["espeak-ng"] = espeak_version()
    except EngineError:
        out["espeak-ng"] = "not installed"
    out["festival"] = festival_version()
    try:
        import subprocess

        out["flite"] = subprocess.run(["flite", "--version"], capture_output=True, text=True).stdout.strip()[:80]
    except OSError:
        out["flite"] = "not installed"
    return out


def generate_corpus(root: Path | str, config: CorpusConfig | None = None, *, workers: int = 2,
                    sentences: dict[str, Sequence[str]] | None = None, splits: Sequence[str] | None = None,
                    augment_splits: Sequence[str] | None = None, overwrite: bool = False, resume: bool = False,
                    progress: ProgressCallback | None = None) -> CorpusSummary:
    """Synthesize the corpus under ``root`` and return per-split figures.

    ``sentences`` replaces the system's sentence sources ({source: raw sentences}; still normalised and
    filtered). ``splits`` limits which splits are written (the plan, and so every utterance, stays the same).
    ``augment_splits`` (default: all) are augmented; the others are clean. A split folder that already holds
    files is an error unless ``overwrite`` (delete it first) or ``resume`` (keep files already written).
    """
    started = time.monotonic()
    config = config or CorpusConfig()
    config.check()
    root = Path(root)
    names = (*config.train_sources, config.heldout_source)
    if sentences is None:
        try:
            pools = load_sources(names, config.min_words, config.max_words)
        except Exception as exc:  # SourceMissing carries the install command
            raise CorpusError(str(exc)) from exc
    else:
        from .sources import filter_sentences

        pools = {n: filter_sentences(sentences.get(n, ()), config.min_words, config.max_words) for n in names}
    plan = plan_corpus(config, pools)
    wanted = list(SPLITS) if splits is None else list(splits)
    unknown = [s for s in wanted if s not in SPLITS]
    if unknown:
        raise CorpusError(f"unknown split(s) {unknown}; choose from {', '.join(SPLITS)}")
    wanted = [s for s in SPLITS if s in wanted and plan[s]]
    augmented = tuple(SPLITS if augment_splits is None else augment_splits)
    for split in wanted:
        folder = root / split
        if folder.exists() and any(folder.iterdir()) and not resume:
            if not overwrite:
                raise CorpusError(f"{folder} already holds files; choose another folder, or pass overwrite "
                                  "or resume")
            shutil.rmtree(folder)
    root.mkdir(parents=True, exist_ok=True)

    chunks = make_chunks(plan, wanted)
    # costly chunks (clustergen voices, Festival) first, so that the pool's tail is short
    cost = {c_id: sum(10.0 if u.voice.synth == "festival" or u.voice.name in ("awb", "rms", "slt") else 1.0
                      for u in c) for c_id, c in enumerate(chunks)}
    order = sorted(range(len(chunks)), key=lambda k: -cost[k])
    done = {s: 0 for s in wanted}
    totals = {s: len(plan[s]) for s in wanted}
    results: dict[str, tuple[int, dict]] = {}

    def collect(rows) -> None:
        for split, utt_id, n, record in rows:
            results[utt_id] = (n, record)
            done[split] += 1
            if progress is not None:
                progress(split, done[split], totals[split])

    init_args = (config, str(root), augmented, resume)
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=_worker_init, initargs=init_args) as pool:
            for rows in pool.imap_unordered(_work, [chunks[k] for k in order], chunksize=1):
                collect(rows)
    else:
        _worker_init(*init_args)
        for k in order:
            collect(_work(chunks[k]))

    summary = CorpusSummary(root, sentence_counts={n: len(p) for n, p in pools.items()})
    for split in wanted:
        s = SplitSummary()
        lines = []
        for u in plan[split]:
            n, record = results[u.utt_id]
            seconds = n / SAMPLE_RATE
            lines.append(json.dumps({"audio_filepath": u.relative_path(config.extension()), "text": u.text,
                                     "duration": round(seconds, 4), "synth": u.voice.synth,
                                     "voice": u.voice.name, "source": u.source, "augment": record}))
            s.utterances += 1
            s.seconds += seconds
            s.by_synth[u.voice.synth] = s.by_synth.get(u.voice.synth, 0.0) + seconds
            s.by_voice[u.voice.speaker] = s.by_voice.get(u.voice.speaker, 0) + 1
            s.by_source[u.source] = s.by_source.get(u.source, 0) + 1
        tmp = root / split / "manifest.jsonl.part"
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, root / split / "manifest.jsonl")
        summary.splits[split] = s
    summary.seconds = time.monotonic() - started

    voices = voice_pools(config)
    recipe = {
        "generator": "examples/make_corpus.py (examples/speechcorpus)",
        "corpus_version": 2,
        "seed": config.seed,
        "config": config.to_json(),
        "audio": {"sample_rate": SAMPLE_RATE, "channels": 1, "format": config.audio_format.upper(),
                  "subtype": config.subtype.upper(), "extension": config.extension()},
        "augmented_splits": [s for s in SPLITS if s in augmented],
        "sentence_counts": summary.sentence_counts,
        "voices": {group: {synth: [v.name for v in vs] for synth, vs in pools_.items()}
                   for group, pools_ in voices.items()},
        "splits": {s: v.to_json() for s, v in summary.splits.items()},
        "generation_seconds": {"+".join(wanted): round(summary.seconds, 1)},
        "workers": workers,
        "licences": {"synthesizers": LICENCES,
                     "sources": {n: SOURCES[n][2] for n in names if n in SOURCES}},
        "versions": versions(),
    }
    _merge_recipe(root / "recipe.json", recipe)
    return summary


def _merge_recipe(path: Path, recipe: dict) -> None:
    """Write ``recipe.json``, keeping the figures of splits written by an earlier call with the same config."""
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        if old.get("config") == recipe["config"]:
            recipe["splits"] = {**old.get("splits", {}), **recipe["splits"]}
            recipe["generation_seconds"] = {**old.get("generation_seconds", {}), **recipe["generation_seconds"]}
    path.write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")
