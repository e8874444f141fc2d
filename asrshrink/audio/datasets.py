"""Read the common speech dataset layouts into one stream of utterances.

``open_dataset(path)`` detects the layout from ``path``:

* ``path`` is a file. Its first non-blank character decides:

  - ``[``: an MLPerf RNN-T manifest (a JSON list of ``{"files": [{"fname": ...}], "original_duration": ...,
    "transcript": ...}`` objects). ``fname`` is relative to the dataset dir, normally the manifest's own
    folder; when the first entry's file is not there, the manifest folder's parent is used instead.
  - ``{``: a JSONL manifest (NeMo convention), one object per line with ``audio_filepath``, ``text`` and an
    optional ``duration``; relative paths are relative to the manifest's folder. The ``.json`` or ``.jsonl``
    suffix does not matter (NeMo manifests are often called ``*.json``).
  - a file named ``*.trans.txt`` is read as one LibriSpeech chapter.

* ``path`` is ``bundled:NAME``: a part of the speech sample bundled with asrshrink (``bundled:test``,
  ``bundled:v2/test-synth``; :func:`bundled_sample_names` lists them).

* ``path`` is a folder. Checked in this order:

  1. LibriSpeech tree: any ``*.trans.txt`` below it (searched recursively, so the split folder such as
     ``dev-clean/`` or any parent of it works). Each ``ID TRANSCRIPT`` line needs an audio file named ``ID``
     with an audio suffix (``.flac`` preferred, then ``.wav``, ``.ogg``, ``.opus``, ...) in the transcript's
     folder, and every audio file in such a folder needs a transcript line.
  2. Folder of audio files: audio files (searched recursively) with a same-name ``.txt`` transcript beside
     them. Once one audio file has a ``.txt``, all of them must.
  3. Exactly one ``*.json``/``*.jsonl`` file directly in the folder: read as a manifest (see above).

Entry order: sorted by id for trees and folders; file order for manifests (MLPerf pins its query order that
way). Ids: the LibriSpeech ``ID``; the audio path relative to the folder without suffix for folders; the audio
file name without suffix for manifests (``#<entry number>`` appended when a name repeats).

Missing files and transcripts are reported when the dataset is opened; unreadable audio when an utterance is
read. Everything a user can fix is a one-line :class:`~asrshrink.errors.DataError`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from asrshrink.audio.text import Vocabulary
from asrshrink.errors import DataError

log = logging.getLogger(__name__)

#: Suffixes taken as audio, in the order preferred when one LibriSpeech id has several files.
AUDIO_SUFFIXES: tuple[str, ...] = (".flac", ".wav", ".ogg", ".opus", ".oga", ".mp3", ".aiff", ".aif", ".au")

if "MP3" not in sf.available_formats():  # libsndfile older than 1.1 cannot read MP3
    AUDIO_SUFFIXES = tuple(s for s in AUDIO_SUFFIXES if s != ".mp3")

#: The bundled speech sample: corpus v1's ``calib`` and ``test`` (LibriSpeech trees, the defaults of --calib and
#: --data) and corpus v2's ``v2/calib``, ``v2/test`` and ``v2/test-synth`` (manifest folders).
BUNDLED_SPEECH = Path(__file__).resolve().parent.parent / "assets" / "speech"
BUNDLED_PREFIX = "bundled:"

#: Reasons counted in ``Dataset.dropped``.
DROP_EMPTY = "empty_transcript"
DROP_LONG = "max_duration"

LAYOUTS_HELP = (
    "accepted layouts: a LibriSpeech tree (speaker/chapter/*.flac with speaker-chapter.trans.txt), "
    "a folder of audio files each with a same-name .txt transcript, "
    "a JSONL manifest (audio_filepath, text, duration per line), "
    "or an MLPerf JSON manifest (list of {files: [{fname}], original_duration, transcript})"
)

# Errors soundfile and libsndfile raise for missing, truncated or unsupported files.
_SF_ERRORS = (sf.SoundFileError, RuntimeError, OSError, ValueError, TypeError, EOFError)


@dataclass(frozen=True)
class Entry:
    """One utterance before its audio is read."""

    id: str
    audio_path: Path
    text: str  # already normalised to the vocabulary
    duration: float | None  # seconds, from the manifest or soundfile.info; None when not looked up
    #: What the layout says about the utterance besides its audio and text, as (name, value) pairs: a JSONL
    #: manifest's other scalar keys (one level of nested objects flattened as ``augment.label``), a LibriSpeech
    #: id's ``speaker`` and ``chapter``. ``eval --by NAME`` groups WER by them.
    fields: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Utterance:
    id: str
    audio: np.ndarray  # float32, mono, at the dataset's sample rate, shape (N,)
    text: str
    duration: float  # len(audio) / sample_rate


@dataclass
class Dataset:
    """A list of entries and how to read them; audio is read on access."""

    entries: list[Entry]
    sample_rate: int
    source: Path
    kind: str  # "librispeech", "folder", "jsonl" or "mlperf"
    dropped: dict[str, int] = field(default_factory=lambda: {DROP_EMPTY: 0, DROP_LONG: 0})

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Utterance:
        entry = self.entries[index]
        audio = read_audio(entry.audio_path, self.sample_rate)
        return Utterance(id=entry.id, audio=audio, text=entry.text, duration=len(audio) / self.sample_rate)

    def __iter__(self) -> Iterator[Utterance]:
        for i in range(len(self.entries)):
            yield self[i]

    def durations(self) -> list[float]:
        """Seconds of audio per entry, in order: from the manifest where it gave them, else from the file headers
        (no audio is decoded)."""
        return [_entry_duration(e) for e in self.entries]

    def total_duration(self) -> float:
        """Seconds of audio over all entries; durations not yet known are read from the file headers."""
        return float(sum(self.durations()))

    def __repr__(self) -> str:
        return (f"Dataset(kind={self.kind!r}, source={str(self.source)!r}, entries={len(self.entries)}, "
                f"sample_rate={self.sample_rate}, dropped={self.dropped})")


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


# --------------------------------------------------------------------------------------------------- audio


def read_audio(path: Path, sample_rate: int = 16000) -> np.ndarray:
    """Read an audio file as float32 mono at ``sample_rate``.

    Integer formats are scaled as soundfile does (int16 / 32768); several channels are averaged; other rates
    are resampled with a polyphase filter (``scipy.signal.resample_poly``).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: audio file not found; check the path or the manifest entry that names it")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: audio file is empty (0 bytes); remove it from the dataset or replace it")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except _SF_ERRORS as exc:
        reason = _sf_reason(exc)
        raise DataError(f"{path}: cannot read audio ({reason}); replace the file or re-encode it as WAV/FLAC") \
            from None
    if data.shape[0] == 0:
        raise DataError(f"{path}: audio file has no samples; remove it from the dataset or replace it")
    audio = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
    if not np.isfinite(audio).all():
        raise DataError(f"{path}: audio contains NaN or infinite samples; replace the file")
    if rate != sample_rate:
        g = math.gcd(int(rate), int(sample_rate))
        audio = resample_poly(audio, sample_rate // g, int(rate) // g)
    return np.ascontiguousarray(audio, dtype=np.float32)


def _sf_reason(exc: Exception) -> str:
    """soundfile's message on one line, less its "Error opening '<path>':" prefix (the caller names the path)."""
    reason = re.sub(r"^Error opening '.*?': ", "", " ".join(str(exc).split()))
    return reason.rstrip(".") or type(exc).__name__


def _audio_info_duration(path: Path) -> float:
    try:
        info = sf.info(str(path))
    except _SF_ERRORS as exc:
        reason = _sf_reason(exc)
        raise DataError(f"{path}: cannot read audio header ({reason}); replace the file or re-encode it as "
                        "WAV/FLAC") from None
    if info.samplerate <= 0:
        raise DataError(f"{path}: audio header has no sample rate; replace the file")
    return info.frames / info.samplerate


def _entry_duration(entry: Entry) -> float:
    return entry.duration if entry.duration is not None else _audio_info_duration(entry.audio_path)


# ------------------------------------------------------------------------------------------------- helpers


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc}); check the file's permissions") from None


def _is_audio(path: Path) -> bool:
    return path.suffix.lower() in AUDIO_SUFFIXES and path.is_file()


def _unique_ids(stems: list[str]) -> list[str]:
    """Keep names as ids; a repeated name gets ``#<1-based position>`` appended."""
    seen: set[str] = set()
    ids = []
    for i, stem in enumerate(stems):
        ids.append(stem if stem not in seen else f"{stem}#{i + 1}")
        seen.add(stem)
    return ids


# ---------------------------------------------------------------------------------------------- LibriSpeech


def _read_librispeech(transcripts: list[Path], vocabulary: Vocabulary) -> list[Entry]:
    entries: list[Entry] = []
    origin: dict[str, Path] = {}
    for trans in sorted(transcripts):
        folder = trans.parent
        audio_by_id: dict[str, Path] = {}
        for f in folder.iterdir():
            if _is_audio(f):
                known = audio_by_id.get(f.stem)
                rank = AUDIO_SUFFIXES.index(f.suffix.lower())
                if known is None or rank < AUDIO_SUFFIXES.index(known.suffix.lower()):
                    audio_by_id[f.stem] = f
        listed: set[str] = set()
        for line_no, line in enumerate(_read_text(trans).splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=1)
            utt_id = parts[0]
            text = parts[1] if len(parts) > 1 else ""
            if utt_id in origin:
                raise DataError(f"{trans}:{line_no}: utterance id {utt_id} also appears in {origin[utt_id]}; "
                                "remove the duplicate line")
            origin[utt_id] = trans
            listed.add(utt_id)
            audio = audio_by_id.get(utt_id)
            if audio is None:
                raise DataError(f"{trans}:{line_no}: transcript line for {utt_id} has no audio file "
                                f"{utt_id}.flac (or .wav/.ogg/.opus) in {folder}; add the audio or delete the "
                                "line")
            entries.append(Entry(id=utt_id, audio_path=audio, text=vocabulary.normalize(text), duration=None,
                                 fields=_librispeech_fields(utt_id)))
        orphans = sorted(stem for stem in audio_by_id if stem not in listed)
        if orphans:
            extra = f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""
            raise DataError(f"{audio_by_id[orphans[0]]}: audio file has no line in {trans.name}{extra}; add "
                            f"'{orphans[0]} TRANSCRIPT' to {trans} or remove the file")
    entries.sort(key=lambda e: e.id)
    return entries


def _librispeech_fields(utt_id: str) -> tuple[tuple[str, str], ...]:
    parts = utt_id.split("-")
    return (("speaker", parts[0]), ("chapter", parts[1])) if len(parts) == 3 else ()


# --------------------------------------------------------------------------------------------------- folder


def _read_folder(root: Path, audio_files: list[Path], vocabulary: Vocabulary) -> list[Entry]:
    by_transcript: dict[Path, Path] = {}
    for audio in sorted(audio_files):
        txt = audio.with_suffix(".txt")
        if not txt.is_file():
            raise DataError(f"{audio}: audio file has no transcript {txt.name} beside it; add {txt.name} "
                            "with the spoken text or remove the audio file")
        if txt in by_transcript:
            raise DataError(f"{txt}: transcript shared by two audio files, {by_transcript[txt].name} and "
                            f"{audio.name}; keep only one of them")
        by_transcript[txt] = audio
    entries = [
        Entry(id=audio.relative_to(root).with_suffix("").as_posix(), audio_path=audio,
              text=vocabulary.normalize(_read_text(txt)), duration=None)
        for txt, audio in by_transcript.items()
    ]
    entries.sort(key=lambda e: e.id)
    return entries


# -------------------------------------------------------------------------------------------------- manifests


def _manifest_duration(value, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise DataError(f"{where}: duration {value!r} is not a non-negative number of seconds; fix or remove it")
    return float(value)


def _read_jsonl(manifest: Path, vocabulary: Vocabulary) -> list[Entry]:
    base = manifest.parent
    rows: list[tuple[Path, str, float | None, tuple[tuple[str, str], ...]]] = []
    for line_no, line in enumerate(_read_text(manifest).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{manifest}:{line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); each line must be "
                            "one JSON object") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object with audio_filepath and text, got "
                            f"{type(obj).__name__}")
        missing = [k for k in ("audio_filepath", "text") if k not in obj]
        if missing:
            raise DataError(f"{where}: missing {' and '.join(missing)}; each line needs audio_filepath and text")
        if not isinstance(obj["audio_filepath"], str) or not obj["audio_filepath"]:
            raise DataError(f"{where}: audio_filepath must be a non-empty string")
        if not isinstance(obj["text"], str):
            raise DataError(f"{where}: text must be a string")
        if obj.get("offset"):
            raise DataError(f"{where}: entries with an offset (segments of a longer file) are not supported; "
                            "cut each segment into its own audio file")
        audio = base / Path(obj["audio_filepath"]).expanduser()
        if not audio.is_file():
            raise DataError(f"{where}: audio file {audio} not found; fix audio_filepath (relative paths are "
                            f"relative to {base})")
        rows.append((audio, obj["text"], _manifest_duration(obj.get("duration"), where), _manifest_fields(obj)))
    ids = _unique_ids([audio.stem for audio, _, _, _ in rows])
    return [Entry(id=i, audio_path=a, text=vocabulary.normalize(t), duration=d, fields=f)
            for i, (a, t, d, f) in zip(ids, rows)]


#: JSONL keys that are the utterance itself, not something to group it by.
_OWN_KEYS = {"audio_filepath", "text", "duration", "offset"}


def _manifest_fields(obj: dict) -> tuple[tuple[str, str], ...]:
    """A manifest line's other scalar values as (name, text) pairs; nested objects one level deep."""
    found: list[tuple[str, str]] = []
    for key, value in obj.items():
        if key in _OWN_KEYS:
            continue
        inner = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, item in inner:
            if isinstance(item, (str, int, float, bool)) and not (isinstance(item, float) and not math.isfinite(item)):
                found.append((key if sub is None else f"{key}.{sub}", str(item)))
    return tuple(found)


def _mlperf_fields(manifest: Path, index: int, item) -> tuple[str, str, float | None]:
    where = f"{manifest}: entry {index}"
    hint = "each entry needs files[0].fname and transcript"
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}; {hint}")
    files = item.get("files")
    if not isinstance(files, list) or not files or not isinstance(files[0], dict) or \
            not isinstance(files[0].get("fname"), str) or not files[0]["fname"]:
        raise DataError(f"{where}: missing files[0].fname; {hint}")
    if not isinstance(item.get("transcript"), str):
        raise DataError(f"{where}: missing transcript; {hint}")
    duration = item.get("original_duration", files[0].get("duration"))
    return files[0]["fname"], item["transcript"], _manifest_duration(duration, where)


def _read_mlperf(manifest: Path, vocabulary: Vocabulary, data: list) -> list[Entry]:
    rows = [_mlperf_fields(manifest, i, item) for i, item in enumerate(data)]
    if not rows:
        return []
    # fname is relative to the dataset dir: normally the manifest's folder, else its parent.
    candidates = [manifest.parent, manifest.parent.parent]
    first = rows[0][0]
    base = next((b for b in candidates if (b / first).is_file()), None)
    if base is None:
        raise DataError(f"{manifest}: entry 0: audio file {first} not found in {candidates[0]} or "
                        f"{candidates[1]}; put the manifest in the dataset dir (the parent of the wav folder)")
    entries = []
    ids = _unique_ids([Path(fname).stem for fname, _, _ in rows])
    for i, (utt_id, (fname, text, duration)) in enumerate(zip(ids, rows)):
        audio = base / fname
        if not audio.is_file():
            raise DataError(f"{manifest}: entry {i}: audio file {audio} not found; fix files[0].fname "
                            f"(relative to {base})")
        entries.append(Entry(id=utt_id, audio_path=audio, text=vocabulary.normalize(text), duration=duration))
    return entries


def _read_manifest(manifest: Path, vocabulary: Vocabulary) -> tuple[str, list[Entry]]:
    """Sniff a manifest file: a JSON list is MLPerf, a JSON object per line is JSONL."""
    text = _read_text(manifest)
    head = text.lstrip()[:1]
    if head == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{manifest}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno}); "
                            "fix the manifest or regenerate it") from None
        if not isinstance(data, list):
            raise DataError(f"{manifest}: expected a JSON list of utterances")
        return "mlperf", _read_mlperf(manifest, vocabulary, data)
    if head == "{":
        return "jsonl", _read_jsonl(manifest, vocabulary)
    if manifest.name.endswith(".trans.txt"):
        return "librispeech", _read_librispeech([manifest], vocabulary)
    if not head:
        raise DataError(f"{manifest}: file is empty; {LAYOUTS_HELP}")
    raise DataError(f"{manifest}: not a dataset manifest; {LAYOUTS_HELP}")


# ----------------------------------------------------------------------------------------------- detection


def _detect(path: Path, vocabulary: Vocabulary) -> tuple[str, list[Entry]]:
    if path.is_file():
        return _read_manifest(path, vocabulary)
    if not path.is_dir():
        raise DataError(f"{path}: not a file or folder; give a dataset folder or manifest")
    transcripts = [p for p in path.rglob("*.trans.txt") if p.is_file()]
    if transcripts:
        return "librispeech", _read_librispeech(transcripts, vocabulary)
    audio_files = [p for p in path.rglob("*") if _is_audio(p)]
    if any(p.with_suffix(".txt").is_file() for p in audio_files):
        return "folder", _read_folder(path, audio_files, vocabulary)
    manifests = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".json", ".jsonl"))
    if len(manifests) == 1:
        return _read_manifest(manifests[0], vocabulary)
    if len(manifests) > 1:
        names = ", ".join(p.name for p in manifests)
        raise DataError(f"{path}: several manifests ({names}); pass the one to use")
    found = f"found {len(audio_files)} audio files but no transcripts; " if audio_files else ""
    raise DataError(f"{path}: no dataset found; {found}{LAYOUTS_HELP}")


def bundled_sample_names() -> list[str]:
    """The parts of the bundled speech sample, as ``bundled:NAME`` takes them (``test``, ``v2/test-synth``)."""
    if not BUNDLED_SPEECH.is_dir():
        return []
    parts = {p.parent for p in BUNDLED_SPEECH.rglob("manifest.jsonl")}
    parts |= {d for d in BUNDLED_SPEECH.iterdir() if d.is_dir() and any(d.rglob("*.trans.txt"))}
    return sorted(p.relative_to(BUNDLED_SPEECH).as_posix() for p in parts)


def resolve_data_path(path: str | Path) -> Path:
    """``path`` as a filesystem path: ``bundled:NAME`` becomes that part of the bundled speech sample, anything
    else is returned as a Path. An unknown NAME is a DataError listing the names there are."""
    text = str(path)
    if not text.startswith(BUNDLED_PREFIX):
        return Path(path)
    name = text[len(BUNDLED_PREFIX):].strip("/")
    names = bundled_sample_names()
    if name not in names:
        have = ", ".join(BUNDLED_PREFIX + n for n in names) if names else "none in this installation"
        raise DataError(f"{text}: no such part of the bundled speech sample; the parts are: {have}")
    return BUNDLED_SPEECH / name


def open_dataset(path: str | Path, *, vocabulary: Vocabulary, sample_rate: int = 16000,
                 max_duration: float | None = None, limit: int | None = None, seed: int = 0,
                 keep_empty: bool = False) -> Dataset:
    """Open a dataset in any supported layout (see the module docstring for the detection rules), with
    transcripts normalised to ``vocabulary`` (a model's: ``model.vocabulary``).

    ``max_duration`` drops utterances strictly longer than it (seconds), using manifest durations where given
    and the audio header otherwise. ``limit`` then keeps a random subset of that many entries, chosen by
    ``seed`` and kept in the dataset's order. Utterances whose transcript normalises to the empty string are
    dropped unless ``keep_empty``: they have no reference words, so they cannot have a WER of their own, and an
    empty result usually means the transcript is in a script the vocabulary lacks. (Kept, jiwer 4 and the
    MLPerf scorer count every hypothesis word on them as an insertion against a corpus total.) Counts of what
    was dropped are in ``Dataset.dropped``.
    """
    source = resolve_data_path(path).expanduser()
    if not source.exists():
        raise DataError(f"{source}: dataset path does not exist; check the path")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise DataError(f"sample rate must be a positive integer, got {sample_rate!r}")
    if max_duration is not None and not max_duration > 0:
        raise DataError(f"the maximum duration must be positive, got {max_duration!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise DataError(f"the number of utterances to use must be a positive integer, got {limit!r}")

    kind, entries = _detect(source, vocabulary)
    if not entries:
        raise DataError(f"{source}: no utterances found; {LAYOUTS_HELP}")
    dropped = {DROP_EMPTY: 0, DROP_LONG: 0}

    if not keep_empty:
        kept = [e for e in entries if e.text]
        dropped[DROP_EMPTY] = len(entries) - len(kept)
        if not kept:
            raise DataError(f"{source}: all {len(entries)} transcripts are empty after normalisation to the "
                            "vocabulary's labels; check that the vocabulary matches the transcripts' language")
        if dropped[DROP_EMPTY]:
            log.warning("%s: dropped %d utterances whose transcript is empty after normalisation",
                        source, dropped[DROP_EMPTY])
        entries = kept

    if max_duration is not None:
        timed = [e if e.duration is not None else replace(e, duration=_audio_info_duration(e.audio_path))
                 for e in entries]
        kept = [e for e in timed if e.duration <= max_duration]
        dropped[DROP_LONG] = len(timed) - len(kept)
        if not kept:
            raise DataError(f"{source}: all {len(timed)} utterances are longer than the maximum duration of "
                            f"{max_duration:g} s; allow longer utterances (--max-duration) or pick other data")
        entries = kept

    if limit is not None and limit < len(entries):
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(len(entries), size=limit, replace=False))
        entries = [entries[int(i)] for i in chosen]

    return Dataset(entries=entries, sample_rate=sample_rate, source=source, kind=kind, dropped=dropped)
