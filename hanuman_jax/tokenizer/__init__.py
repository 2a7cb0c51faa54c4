"""Unigram tokenizer: train, evaluate, use, export (python -m hanuman_jax.tokenizer)."""

from hanuman_jax.tokenizer.core import (
    BOS,
    EOS,
    LANG_TAGS,
    NEWLINE,
    PAD,
    ROLES,
    SPECIAL_IDS,
    THAI_DIGITS,
    UNK,
    USER_SYMBOLS,
    Tokenizer,
    normalize,
)

__all__ = [
    "BOS", "EOS", "LANG_TAGS", "NEWLINE", "PAD", "ROLES", "SPECIAL_IDS", "THAI_DIGITS", "UNK",
    "USER_SYMBOLS", "Tokenizer", "normalize",
]  # fmt: skip
