"""Records to token ids: the step shared by the training pipeline and `prepare` (no Grain here)."""

from __future__ import annotations

import threading

import numpy as np

from hanuman_jax.data.sources import SKIP_REASONS, Skip
from hanuman_jax.tokenizer import Tokenizer

_tokenizers: dict[str, Tokenizer] = {}
_tokenizers_lock = threading.Lock()


def _tokenizer(path: str) -> Tokenizer:
    with _tokenizers_lock:
        if path not in _tokenizers:
            _tokenizers[path] = Tokenizer(path)
        return _tokenizers[path]


def tokenize_record(record, tokenizer_path: str, strict: bool = False) -> dict[str, np.ndarray]:
    """Record -> {'tokens', 'loss_mask'} or {'skip': reason index}.

    A chat trains only on the assistant's tokens; pre-tokenized records pass through. With
    `strict`, an unusable record raises DataError naming its file and line.
    """
    if isinstance(record, Skip):
        if strict:
            raise record.error()
        return {"skip": np.int32(SKIP_REASONS.index(record.reason))}
    if isinstance(record, dict):
        return record
    tokenizer = _tokenizer(tokenizer_path)
    if record.messages is not None:
        ids, mask = tokenizer.encode_chat(record.messages)
    else:
        ids = tokenizer.encode_document(record.text)
        mask = [1] * len(ids)
    return {"tokens": np.asarray(ids, np.int32), "loss_mask": np.asarray(mask, np.int32)}
