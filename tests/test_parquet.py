"""Parquet sources read only the columns the schemas (or a field_map) need."""

import pytest

from hanuman_jax.data import DataError
from hanuman_jax.data.sources import open_source

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _records(path, **spec):
    source = open_source({"path": str(path), **spec}, "test")
    return [source[i] for i in range(len(source))]


def _with_a_broken_column(path, table, broken: str):
    """Writes `table` and overwrites column `broken`'s pages with garbage: reading it fails."""
    pq.write_table(table, path, compression="NONE", use_dictionary=False)
    meta = pq.ParquetFile(path).metadata.row_group(0)
    chunk = meta.column(table.column_names.index(broken))
    with open(path, "r+b") as f:
        f.seek(chunk.data_page_offset)
        f.write(b"\xff" * chunk.total_compressed_size)
    with pytest.raises(Exception):  # noqa: B017 (pyarrow's error type varies with the damage)
        pq.read_table(path).column(broken).to_pylist()
    return path


def test_a_column_no_schema_reads_is_never_read(tmp_path):
    table = pa.table({
        "id": list(range(5)),
        "text": [f"ข้อความ {i}" for i in range(5)],
        "embedding": [b"\x01" * 100_000] * 5,  # large, and made unreadable below
    })  # fmt: skip
    f = _with_a_broken_column(tmp_path / "t.parquet", table, "embedding")
    assert [d.text for d in _records(f)] == [f"ข้อความ {i}" for i in range(5)]
    source = open_source({"path": str(f)}, "test")
    assert list(source.columns) == ["text"]


def test_only_the_field_map_columns_are_read(tmp_path):
    table = pa.table({
        "question": ["q0", "q1"],
        "text": ["not read: the field_map names the fields", "-"],
        "answer": ["a0", "a1"],
        "blob": [b"\x02" * 50_000] * 2,
    })  # fmt: skip
    f = _with_a_broken_column(tmp_path / "qa.parquet", table, "blob")
    fmap = {"instruction": "question", "output": "answer"}
    docs = _records(f, field_map=fmap)
    assert docs[1].messages == ({"role": "user", "content": "q1"},
                                {"role": "assistant", "content": "a1"})  # fmt: skip
    with pytest.raises(DataError, match=r"qa.parquet\[row 0\]: field_map names \['reply'\], not "
                       r"in this row's keys \['answer', 'blob', 'question', 'text'\]"):  # fmt: skip
        _records(f, field_map={"instruction": "question", "output": "reply"})
    unknown = tmp_path / "unknown.parquet"
    pq.write_table(pa.table({"question": ["q"], "blob": [b"x"]}), unknown)
    with pytest.raises(DataError, match=r"unknown.parquet\[row 0\]: unrecognised row; keys are "
                       r"\['blob', 'question'\]"):  # fmt: skip
        _records(unknown)
