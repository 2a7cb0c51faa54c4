"""Data: sources, the Grain training pipeline, token shards, and `python -m hanuman_jax.data`."""

from hanuman_jax.data.files import iter_records, resolve_file, resolve_paths
from hanuman_jax.data.pipeline import make_dataset, read_documents
from hanuman_jax.schemas import DataError, Document

__all__ = [
    "DataError",
    "Document",
    "iter_records",
    "make_dataset",
    "read_documents",
    "resolve_file",
    "resolve_paths",
]
