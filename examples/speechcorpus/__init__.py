"""Corpus v2 for asrshrink's reference models: several synthesizers, many sentence sources, augmentation.

Kept out of the runtime package (``asrshrink``): it drives GPL and system synthesizers and only makes data.
``examples/make_corpus.py`` is its command line; see ``corpus.py`` for the layout and the splits.
"""
