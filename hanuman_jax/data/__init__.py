"""Data: sources, the Grain training pipeline, token shards, and `python -m hanuman_jax.data`.

The pipeline (and Grain) is imported on first use, so that the tokenizer CLI and `prepare`'s
worker processes, which need only the sources, start fast.
"""

from hanuman_jax.data.files import iter_records, resolve_file, resolve_paths
from hanuman_jax.data.schemas import DataError, Document

__all__ = [
    "DataError",
    "Document",
    "iter_records",
    "make_dataset",
    "read_documents",
    "resolve_file",
    "resolve_paths",
]


def __getattr__(name: str):
    if name in ("make_dataset", "read_documents"):
        from hanuman_jax.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'hanuman_jax.data' has no attribute {name!r}")
