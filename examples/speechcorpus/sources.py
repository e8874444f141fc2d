"""Offline English sentence sources (Debian packages), read, normalised to the MLPerf labels and filtered.

Each source is a function returning raw text fragments; :func:`clean_sentence` normalises one fragment to the
28-symbol MLPerf vocabulary (space, a-z, apostrophe) or rejects it. The sources and their Debian packages:

=================  ======================  ==========================================================  ==========
source             package                 what is read                                                licence
=================  ======================  ==========================================================  ==========
wordnet-examples   wordnet-base            quoted example sentences in the glosses of ``data.*``       WordNet 3.0
wordnet-glosses    wordnet-base            the definitions of those glosses (the text before the       WordNet 3.0
                                           examples)
fortunes           fortunes, fortunes-min  the sentences of each fortune (attributions cut off)        BSD (files:
                                                                                                        see package)
gcide              dict-gcide              text between double quotes, whole file (see the reader's    GPL-2+
                                           known defect; corpus v2 uses it)
gcide-quotes       dict-gcide              quotations ("...") entry by entry (the fixed reader)        GPL-2+
kjv                bible-kjv-text          King James Bible verses (``bible -l0``), cut at . ; : ? !   public domain
                   (+ bible-kjv program)                                                               text
devil              dict-devil              Bierce's definitions (headwords and verse left out)        public domain
jargon             dict-jargon             the Jargon File's prose                                    public domain
=================  ======================  ==========================================================  ==========
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Iterable

from asrshrink.audio.text import normalize_text

#: The corpus transcripts' alphabet: space, a-z and apostrophe (what character models such as MLPerf's emit).
CORPUS_LETTERS: tuple[str, ...] = (" ", *"abcdefghijklmnopqrstuvwxyz", "'")

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNE_DIR = Path("/usr/share/games/fortunes")
DICTD_DIR = Path("/usr/share/dictd")
_WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
#: Fortune files that hold pictures or lists of excuses rather than prose.
_FORTUNE_SKIP = {"ascii-art", "art", "bofh-excuses"}

_QUOTED = re.compile(r'"([^"]+)"')
_OVERSTRIKE = re.compile(r".\x08")
_ATTRIBUTION = re.compile(r"^\s*--\s")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_CLAUSE_END = re.compile(r"(?<=[.!?;:])[\"')\]]*\s+")
_CODE_LIKE = re.compile(r"[@/\\<>{}|=#~^_*\[\]]|https?:|www\.")
_HAS_VOWEL = re.compile(r"[aeiouy]")
_DEVIL_HEAD = re.compile(r"^[A-Z][A-Z'\- ]+,\s+(?:[a-z]{1,5}\.\s*)+")


# ----------------------------------------------------------------------------------------------- readers


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


def _wordnet_glosses(paths: Iterable[Path | str]) -> Iterable[str]:
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  ") or " | " not in line:
                    continue  # licence header or a synset without a gloss
                yield line.split(" | ", 1)[1]


def read_wordnet_examples(paths: Iterable[Path | str]) -> list[str]:
    """Quoted example sentences from the glosses of WordNet ``data.*`` files, in file order."""
    return [m.group(1).strip() for gloss in _wordnet_glosses(paths) for m in _QUOTED.finditer(gloss)]


def read_wordnet_definitions(paths: Iterable[Path | str]) -> list[str]:
    """The definitions of WordNet glosses: each ``;``-separated part that is not a quoted example."""
    out: list[str] = []
    for gloss in _wordnet_glosses(paths):
        text = _QUOTED.sub("", gloss)
        out.extend(part.strip() for part in text.split(";") if part.strip())
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


def _read_dict(path: Path) -> str:
    opener = gzip.open if path.suffix == ".dz" else open  # dictzip is gzip-compatible
    with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
        return fh.read()


def read_gcide_quotations(text: str) -> list[str]:
    """Text between double quotes, the whole file's lines joined (the ``gcide`` source of corpus v2).

    Known defect, kept so that corpus v2 stays reproducible: the quote marks inside headword pronunciations
    (``\\A*bate"\\``) pair up with the quotations' own, so many fragments are definitions or etymologies
    rather than quotations. :func:`read_gcide_entry_quotations` (source ``gcide-quotes``) is the fixed reader.
    """
    joined = " ".join(text.replace("{", "").replace("}", "").split())
    return [m.group(1).strip() for m in _QUOTED.finditer(joined)]


_GCIDE_PRON = re.compile(r"\\[^\\\n]*\\")


def read_gcide_entry_quotations(text: str) -> list[str]:
    """Quotations from GCIDE's dictd text, entry by entry, with headword pronunciations removed first."""
    out: list[str] = []
    for entry in re.split(r"\n\s*\n", text):
        body = " ".join(_GCIDE_PRON.sub(" ", entry).replace("{", "").replace("}", "").split())
        out.extend(m.group(1).strip() for m in _QUOTED.finditer(body))
    return out


def read_kjv_clauses(text: str) -> list[str]:
    """Clauses of ``bible -l0`` output: verse lines (``  N text``) cut after ``. ; : ? !``."""
    out: list[str] = []
    for line in text.splitlines():
        m = re.match(r"^\s+\d+\s+(.*)$", line)
        if m:
            out.extend(s.strip() for s in _CLAUSE_END.split(m.group(1)) if s.strip())
    return out


def read_devil_sentences(text: str) -> list[str]:
    """Sentences of the Devil's Dictionary definitions: headword and part of speech cut off, verse
    (indented) and attributions left out."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        if not lines or lines[0].startswith(" ") or not _DEVIL_HEAD.match(lines[0]):
            continue
        body = _DEVIL_HEAD.sub("", " ".join(line.strip() for line in lines))
        out.extend(s.strip() for s in _SENTENCE_END.split(body) if s.strip())
    return out


def read_jargon_sentences(text: str) -> list[str]:
    """Sentences of the Jargon File's indented prose paragraphs (cross-reference braces removed)."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        if not lines or not lines[0].startswith("    "):
            continue
        body = " ".join(line.strip() for line in lines).replace("{", "").replace("}", "")
        body = body.replace("\u201c", '"').replace("\u201d", '"')
        out.extend(s.strip().strip('"') for s in _SENTENCE_END.split(body) if s.strip())
    return out


def _bible_text() -> str:
    exe = shutil.which("bible")
    if exe is None:
        raise FileNotFoundError("bible")
    return subprocess.run([exe, "-l0", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout


def _dict_file(name: str) -> Path:
    path = DICTD_DIR / f"{name}.dict.dz"
    if not path.is_file():
        raise FileNotFoundError(str(path))
    return path


def _need(paths: list[Path], what: str) -> list[Path]:
    if not paths:
        raise FileNotFoundError(what)
    return paths


#: name -> (reader of raw fragments from the system's files, Debian packages that provide them, licence).
SOURCES: dict[str, tuple[Callable[[], list[str]], str, str]] = {
    "wordnet-examples": (lambda: read_wordnet_examples(_need(default_wordnet_files(), "WordNet")),
                         "wordnet-base", "WordNet 3.0 licence (permissive, Princeton)"),
    "wordnet-glosses": (lambda: read_wordnet_definitions(_need(default_wordnet_files(), "WordNet")),
                        "wordnet-base", "WordNet 3.0 licence (permissive, Princeton)"),
    "fortunes": (lambda: read_fortune_sentences(_need(default_fortune_files(), "fortunes")),
                 "fortunes fortunes-min", "BSD (fortune-mod); the quotations are of mixed origin"),
    "gcide": (lambda: read_gcide_quotations(_read_dict(_dict_file("gcide"))),
              "dict-gcide", "GPL-2.0-or-later (GCIDE); the quoted texts are old literature"),
    "gcide-quotes": (lambda: read_gcide_entry_quotations(_read_dict(_dict_file("gcide"))),
                     "dict-gcide", "GPL-2.0-or-later (GCIDE); the quoted texts are old literature"),
    "kjv": (lambda: read_kjv_clauses(_bible_text()), "bible-kjv bible-kjv-text",
            "public domain text (KJV 1611); bible-kjv program GPL-2.0-or-later"),
    "devil": (lambda: read_devil_sentences(_read_dict(_dict_file("devil"))), "dict-devil", "public domain"),
    "jargon": (lambda: read_jargon_sentences(_read_dict(_dict_file("jargon"))), "dict-jargon",
               "public domain (Jargon File 4.4.7)"),
}


# ----------------------------------------------------------------------------------------------- cleaning


def clean_sentence(raw: str, min_words: int = 4, max_words: int = 20) -> str | None:
    """The normalised sentence if it is speakable and ``min_words``-``max_words`` words long, else None.

    Dropped: code-like text (paths, addresses, markup), text that is mostly not letters, words without a
    vowel longer than one letter (the synthesizers would spell them out) and words over 20 letters.
    Apostrophes at the edges of words (quotation marks) are removed.
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


class SourceMissing(Exception):
    """A sentence source's files are not installed (the message names the Debian packages)."""


def load_sources(names: Iterable[str], min_words: int = 4, max_words: int = 20,
                 readers: dict[str, Callable[[], list[str]]] | None = None) -> dict[str, list[str]]:
    """Sorted, normalised sentences of each named source; a sentence found in several sources is kept only
    in the first one named. ``readers`` overrides the system readers (tests)."""
    out: dict[str, list[str]] = {}
    seen: set[str] = set()
    for name in names:
        if readers is not None and name in readers:
            reader = readers[name]
        elif name in SOURCES:
            reader = SOURCES[name][0]
        else:
            raise SourceMissing(f"unknown sentence source {name!r}; known: {', '.join(SOURCES)}")
        try:
            raw = reader()
        except (FileNotFoundError, subprocess.CalledProcessError) as exc:
            package = SOURCES[name][1] if name in SOURCES else "?"
            raise SourceMissing(f"sentence source {name} is not installed ({exc}); "
                                f"`apt-get install {package}`") from exc
        kept = [s for s in filter_sentences(raw, min_words, max_words) if s not in seen]
        if not kept:
            raise SourceMissing(f"sentence source {name} gave no usable sentence")
        seen.update(kept)
        out[name] = kept
    return out
