"""Vocabularies (character labels, SentencePiece tokenizers) and transcript normalisation to a model's labels.

No family's labels live here: each family declares its own (``asrshrink.models``)."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

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


def normalize_text(text: str, labels: tuple[str, ...]) -> str:
    """Map free text onto a model's labels.

    ASCII folding of characters the labels lack (``é`` stays when a label holds it), lower case unless the
    labels have upper-case letters, digits spelt out, common abbreviations expanded, ``&``/``+``/``%`` as words,
    other punctuation as spaces, characters outside ``labels`` dropped, white space collapsed.
    """
    allowed = set("".join(labels))
    cased = any(ch.isupper() for ch in allowed)
    if not cased:
        text = text.lower()
    text = "".join(ch if ch in allowed else "".join(c for c in unicodedata.normalize("NFKD", ch)
                                                      if not unicodedata.combining(c)) for ch in text)
    text = text.replace("\u2019", "'").replace("`", "'")
    for old, new in _REPLACEMENTS:
        text = text.replace(old, new)
    text = re.sub(r"\b(" + "|".join(_ABBREVIATIONS) + r")\.", lambda m: _ABBREVIATIONS[m.group(1)] + " ", text)
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)
    text = re.sub(r"\d+", lambda m: " " + number_to_words(int(m.group())) + " ", text)
    text = "".join(ch if ch in allowed else " " for ch in text)
    return " ".join(text.split())


@dataclass(frozen=True)
class Vocabulary:
    """Output labels of a transducer; ``blank`` is the id of the blank symbol (after the labels by default)."""

    labels: tuple[str, ...]
    blank: int = -1

    def __post_init__(self) -> None:
        if self.blank == -1:
            object.__setattr__(self, "blank", len(self.labels))

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


class SentencePieceVocabulary:
    """A SentencePiece tokenizer's pieces as transducer outputs; blank is the id after the last piece (NeMo's
    convention: the tokenizer's vocabulary size V excludes blank, and blank is id V).

    Transcripts are normalised as for character models (ASCII folding, lower case, numbers as words,
    punctuation as spaces), keeping only characters that occur in the pieces, then encoded by the tokenizer.
    The serialized tokenizer travels in ``to_json`` so a saved model needs no side files.
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        import sentencepiece

        self.model_proto = bytes(model_proto)
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self.model_proto)
        except (RuntimeError, OSError) as exc:
            raise ValueError(f"not a SentencePiece model ({str(exc).strip()[:120]})") from None
        self.labels: tuple[str, ...] = tuple(self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size()))
        self.blank = len(self.labels)
        chars = {ch for i, piece in enumerate(self.labels)
                 if not (self._sp.is_control(i) or self._sp.is_unknown(i) or self._sp.is_unused(i))
                 for ch in piece.replace("\u2581", " ")}
        self._chars = tuple(sorted(chars | {" "}))

    @property
    def size(self) -> int:
        return len(self.labels) + 1

    def normalize(self, text: str) -> str:
        return normalize_text(text, self._chars)

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) != self.blank])

    def to_json(self) -> dict:
        import base64

        return {"kind": self.kind, "model": base64.b64encode(self.model_proto).decode("ascii"), "blank": self.blank}

    @classmethod
    def from_json(cls, data: dict) -> "SentencePieceVocabulary":
        import base64

        vocab = cls(base64.b64decode(data["model"], validate=True))
        if int(data.get("blank", vocab.blank)) != vocab.blank:
            raise ValueError(f"blank id {data['blank']} does not follow the tokenizer's {vocab.blank} pieces")
        return vocab

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SentencePieceVocabulary) and other.model_proto == self.model_proto

    def __hash__(self) -> int:
        return hash(self.model_proto)

    def __deepcopy__(self, memo: dict) -> "SentencePieceVocabulary":
        return self  # immutable

    def __reduce__(self):
        return (SentencePieceVocabulary, (self.model_proto,))


def vocabulary_from_json(data: dict) -> "Vocabulary | SentencePieceVocabulary":
    """The vocabulary a ``to_json`` dict describes (character labels, or a SentencePiece tokenizer)."""
    if data.get("kind") == SentencePieceVocabulary.kind:
        return SentencePieceVocabulary.from_json(data)
    return Vocabulary.from_json(data)
