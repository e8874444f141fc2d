"""Sentence sources of corpus v2 (readers run on tiny made-up files: no Debian package needed)."""

from __future__ import annotations

import pytest

from asrshrink.models.mlperf_rnnt import MLPERF_LABELS
from speechcorpus.sources import (
    SOURCES, SourceMissing, clean_sentence, filter_sentences, load_sources, read_devil_sentences,
    read_fortune_sentences, read_gcide_entry_quotations, read_gcide_quotations, read_jargon_sentences, read_kjv_clauses,
    read_wordnet_definitions, read_wordnet_examples, split_fortune,
)


def test_clean_sentence_normalises_and_filters():
    assert clean_sentence("Mr. Smith paid $5 for 2 apples!") == "mister smith paid five for two apples"
    assert clean_sentence("'Tis the season,' she said.") == "tis the season she said"
    assert clean_sentence("Too short.") is None  # 2 words
    assert clean_sentence(" ".join(["word"] * 21)) is None
    assert clean_sentence(" ".join(["word"] * 20)) is not None
    assert clean_sentence("See /usr/local/bin for the files") is None  # code-like
    assert clean_sentence("Send mail to someone@example.com today please") is None
    assert clean_sentence("The xyzzy prgrm was nt found here") is None  # vowel-less word would be spelt out
    assert clean_sentence("1 2 3 4 5 6 7 8 9 10 11") is None  # mostly digits
    assert clean_sentence("The [1913 Webster] entry is here today") is None  # markup


def test_filter_sentences_dedupes_and_sorts():
    raw = ["The cat sat on the mat.", "the CAT sat on the mat", "A dog ran in the park!", "No.",
           "Zebras eat lots of grass"]
    assert filter_sentences(raw) == ["a dog ran in the park", "the cat sat on the mat", "zebras eat lots of grass"]
    assert filter_sentences(raw, max_words=5) == ["zebras eat lots of grass"]
    assert all(set(s) <= set(MLPERF_LABELS) for s in filter_sentences(raw))


def test_wordnet_examples_and_definitions(tmp_path):
    wordnet = tmp_path / "data.noun"
    wordnet.write_text(
        "  1 This software and database is provided \"as is\" and without warranty\n"
        "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known; "
        "\"the entity was seen by many people\"; \"it took the form of a cloud over the hills\"\n"
        "00002137 03 n 02 abstraction 0 | a general concept with no example; a second sense\n", encoding="utf-8")
    assert read_wordnet_examples([wordnet]) == ["the entity was seen by many people",
                                                "it took the form of a cloud over the hills"]
    assert read_wordnet_definitions([wordnet]) == ["that which is perceived or known",
                                                   "a general concept with no example", "a second sense"]


def test_fortunes():
    text = "Never put off till tomorrow\nwhat you can do today. Or\nthe day after.\n    -- Mark Twain\n"
    assert split_fortune(text) == ["Never put off till tomorrow what you can do today.", "Or the day after."]


def test_fortune_files(tmp_path):
    fortunes = tmp_path / "wisdom"
    fortunes.write_text("A fool and his money are soon parted. Keep both safe!\n%\n"
                        "He who l\x08laughs last thinks slowest.\n\t\t-- Anonymous\n%\n", encoding="utf-8")
    assert read_fortune_sentences([fortunes]) == ["A fool and his money are soon parted.", "Keep both safe!",
                                                  "He who laughs last thinks slowest."]


def test_dictionary_readers():
    gcide = ('Abate \\A*bate"\\, v. t.\n   To beat down. "The king\n   abated his {pride} at last" --Shak.\n'
             '   [1913 Webster]\n')
    assert read_gcide_entry_quotations(gcide) == ["The king abated his pride at last"]
    # corpus v2's reader pairs the pronunciation's quote mark with the quotation's (documented defect)
    assert read_gcide_quotations(gcide) == ["\\, v. t. To beat down."]
    kjv = "\nGenesis 1\n\n  1 In the beginning God created the heaven; and the earth was void.\n"
    assert read_kjv_clauses(kjv) == ["In the beginning God created the heaven;", "and the earth was void."]
    devil = ("AGE, n.  That period of life in which we compound for the vices.\nIt is long.\n\n"
             "    \"A poem line,\"\n    said Tom.\n\nAIM, n.  The task we set our wishes to.\n")
    assert read_devil_sentences(devil) == ["That period of life in which we compound for the vices.",
                                           "It is long.", "The task we set our wishes to."]
    jargon = ("alpha geek\n n.\n\n    [from ethologists] The most accomplished person in some {context}. "
              "\u201cAsk Larry.\u201d\n")
    assert read_jargon_sentences(jargon) == ["[from ethologists] The most accomplished person in some context.",
                                             "Ask Larry."]


def test_load_sources_dedupes_across_sources_and_names_missing_packages():
    readers = {"fortunes": lambda: ["The same sentence in both sources.", "Only in the fortunes file here."],
               "kjv": lambda: ["The same sentence in both sources!", "And the earth was without form."]}
    out = load_sources(["fortunes", "kjv"], readers=readers)
    assert out == {"fortunes": ["only in the fortunes file here", "the same sentence in both sources"],
                   "kjv": ["and the earth was without form"]}

    def missing():
        raise FileNotFoundError("/usr/share/dictd/devil.dict.dz")

    with pytest.raises(SourceMissing, match="apt-get install dict-devil"):
        load_sources(["devil"], readers={"devil": missing})
    with pytest.raises(SourceMissing, match="unknown sentence source"):
        load_sources(["nope"])
    assert {"wordnet-examples", "wordnet-glosses", "fortunes", "gcide", "kjv", "devil", "jargon"} <= set(SOURCES)
