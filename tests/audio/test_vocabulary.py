"""SentencePiece vocabularies: normalisation keeps what the tokenizer can spell (case, accents), and the
tokenizer survives a JSON round trip."""

import io

import pytest
import sentencepiece

from asrshrink.audio.text import SentencePieceVocabulary, normalize_text, vocabulary_from_json

TEXT = ["Über das Café am Fluss", "Hello World and more Words", "the Quick brown Fox"] * 30


def tokenizer(lines: list[str]) -> bytes:
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=40,
                                            model_type="bpe", character_coverage=1.0, minloglevel=2)
    return model.getvalue()


@pytest.fixture(scope="module")
def cased():
    return SentencePieceVocabulary(tokenizer(TEXT))


def test_a_cased_tokenizer_keeps_case_and_accents(cased):
    text = cased.normalize("Über Café, Hello!")
    assert text == "Über Café Hello"
    assert cased.normalize("HELLO") == "H"  # upper-case E, L, O are in none of its pieces: dropped, not folded
    assert cased.decode(cased.encode(text)) == text


def test_a_lower_case_tokenizer_folds_case_and_accents():
    lower = SentencePieceVocabulary(tokenizer([t.lower() for t in TEXT]))
    assert lower.normalize("Über CAFÉ") == "über café"  # ü and é are among its pieces' characters
    assert normalize_text("Über CAFÉ", tuple(" abcdefghijklmnopqrstuvwxyz")) == "uber cafe"


def test_round_trip_and_blank(cased):
    again = vocabulary_from_json(cased.to_json())
    assert again == cased and again.blank == len(cased.labels) == cased.size - 1
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        SentencePieceVocabulary(b"not a model")
