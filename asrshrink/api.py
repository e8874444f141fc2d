"""Library entry points for notebooks and scripts: load, featurize, encode, decode, evaluate, describe, dump.

A facade only: it re-exports what lives in the package's own modules, and nothing inside ``asrshrink/``
imports it (``tests/test_layering.py`` checks that), so it can name everything without import cycles.
No Typer or rich here: long work reports through an optional ``progress(done, total)`` callback.
"""

from __future__ import annotations

from asrshrink.audio.datasets import Dataset, batches_by_duration, open_dataset
from asrshrink.evaluate.corpus import EvalResult, Progress, evaluate
from asrshrink.evaluate.transcribe import Hypothesis, dump, encode, featurize, transcribe
from asrshrink.models.base import Transducer
from asrshrink.models.checkpoint import ModelInfo, load_model, save_model
from asrshrink.models.describe import describe

__all__ = ["load_model", "save_model", "open_dataset", "featurize", "encode", "transcribe", "evaluate",
           "describe", "dump", "EvalResult", "Hypothesis", "ModelInfo", "Transducer", "Dataset",
           "batches_by_duration", "Progress"]
