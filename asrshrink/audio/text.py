"""Character vocabularies and transcript normalisation to a model's labels."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

#: The MLPerf RNN-T labels in id order: space, a-z, apostrophe. Blank is appended after them (id 28).
MLPERF_LABELS: tuple[str, ...] = (" ", *"abcdefghijklmnopqrstuvwxyz", "'")

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"), (100, "hundred"))


def number_to_words(n: int) -> str:
    """Spell a non-negative integer in English words ("1984" -> "one thousand nine hundred eighty four")."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    for value, name in _SCALES:
        if n >= value:
            head, rest = divmod(n, value)
            words = number_to_words(head) + " " + name
            return words if rest == 0 else words + " " + number_to_words(rest)
    raise AssertionError("unreachable")


_REPLACEMENTS = (("&", " and "), ("+", " plus "), ("%", " percent "))
_ABBREVIATIONS = {"mr": "mister", "mrs": "missus", "dr": "doctor", "st": "saint", "co": "company",
                  "jr": "junior", "sr": "senior", "vs": "versus", "etc": "et cetera"}


def normalize_text(text: str, labels: tuple[str, ...] = MLPERF_LABELS) -> str:
    """Map free text onto a model's labels.

    ASCII folding, lower case, digits spelt out, common abbreviations expanded, ``&``/``+``/``%`` as words,
    other punctuation as spaces, characters outside ``labels`` dropped, white space collapsed.
    """
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    text = text.replace("\u2019", "'").replace("`", "'")
    for old, new in _REPLACEMENTS:
        text = text.replace(old, new)
    text = re.sub(r"\b(" + "|".join(_ABBREVIATIONS) + r")\.", lambda m: _ABBREVIATIONS[m.group(1)] + " ", text)
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)
    text = re.sub(r"\d+", lambda m: " " + number_to_words(int(m.group())) + " ", text)
    allowed = set(labels)
    text = "".join(ch if ch in allowed else " " for ch in text)
    return " ".join(text.split())


@dataclass(frozen=True)
class Vocabulary:
    """Output labels of a transducer; ``blank`` is the id of the blank symbol (after the labels by default)."""

    labels: tuple[str, ...] = MLPERF_LABELS
    blank: int = len(MLPERF_LABELS)

    @property
    def size(self) -> int:
        """Number of joint outputs, blank included."""
        return len(self.labels) + 1

    def normalize(self, text: str) -> str:
        return normalize_text(text, self.labels)

    def encode(self, text: str) -> list[int]:
        """Ids of an already normalised transcript (characters outside the labels are an error)."""
        index = {ch: i for i, ch in enumerate(self.labels)}
        return [index[ch] for ch in text]

    def decode(self, ids) -> str:
        return "".join(self.labels[int(i)] for i in ids if int(i) != self.blank)

    def to_json(self) -> dict:
        return {"labels": list(self.labels), "blank": self.blank}

    @classmethod
    def from_json(cls, data: dict) -> "Vocabulary":
        return cls(labels=tuple(data["labels"]), blank=int(data["blank"]))
