"""Small CT-CLIP v2 checkpoints made on the fly (the library's maker, shared with the Slicer self-test)."""

from __future__ import annotations

from pathlib import Path

from conftest import data_root
from CTFoundationLib.models.small_ctclip import make_small_ctclip  # noqa: F401  (used by the tests)


def bert_vocab() -> Path:
    """A real WordPiece vocabulary (bert-base-uncased) standing in for CXR-BERT's, which has the same size."""
    return data_root() / "vocab" / "bert-base-uncased_vocab.txt"
