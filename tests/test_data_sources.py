"""Every kind of source, bad input (skipped and counted, or strict), and prepared token shards."""

import json

import ml_collections
import numpy as np
import pytest

from hanuman_jax.data import DataError, make_dataset, read_documents, records, resolve_file
from hanuman_jax.data import prepare as prepare_module
from hanuman_jax.data.prepare import prepare, prepare_source
from hanuman_jax.data.sources import SKIP_REASONS, Skip, open_source

TOKENIZER = "bundled:tokenizer.model"


def _cfg(sources, seq_len=32, batch=4, **data):
    base = {"sources": sources, "seq_len": seq_len, "tokenizer": TOKENIZER, "strict": False,
            "packing": "concat", "eval_sources": [], "seq_len_schedule": []}  # fmt: skip
    return ml_collections.ConfigDict(
        {"data": base | data, "train": {"batch_size": batch, "seed": 0, "steps": 100}}
    )


def _records(path, **spec):
    source = open_source({"path": str(path), **spec}, "test")
    return [source[i] for i in range(len(source))]


def test_text_lines_paragraphs_and_crlf(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"first line\r\nsecond\r\n\r\n   \nthird para\nstill third\n\n\nlast")
    lines = _records(f)
    assert [getattr(r, "text", None) for r in lines] == [
        "first line", "second", None, "third para", "still third", "last"
    ]  # fmt: skip
    assert (
        isinstance(lines[2], Skip) and lines[2].reason == "empty" and lines[2].where.endswith(":4")
    )
    paragraphs = _records(f, format="paragraphs")
    assert [d.text for d in paragraphs] == ["first line\nsecond", "third para\nstill third", "last"]


def test_bad_records_are_skipped_counted_or_strict(tmp_path):
    good = {"text": "สวัสดี hello world"}
    f = tmp_path / "messy.jsonl"
    lines = [json.dumps(good, ensure_ascii=False).encode()] * 3 + [
        b'{"text": broken',  # line 4: malformed JSON
        b'{"text": "\xff\xfe bad bytes"}',  # line 5: invalid UTF-8
        b'{"text": "   "}',  # line 6: empty document
        b'{"title_only": "x"}',  # line 7: missing field
        json.dumps(good).encode(),
    ]
    f.write_bytes(b"\n".join(lines) + b"\n")
    got = _records(f)
    assert [r.reason for r in got if isinstance(r, Skip)] == [
        "malformed_json", "invalid_utf8", "empty", "missing_field"
    ]  # fmt: skip
    assert [r.where.rsplit(":", 1)[1] for r in got if isinstance(r, Skip)] == ["4", "5", "6", "7"]
    assert len(read_documents(f)) == 4

    it = iter(make_dataset(_cfg([{"path": str(f)}], batch=1), resolve_file(TOKENIZER)))
    stats = [next(it)["stats"] for _ in range(12)][-1]  # 12 rows of 32: several epochs
    skipped = dict(zip(SKIP_REASONS, stats["skipped"], strict=True))
    assert min(skipped.values()) >= 2 and len(set(skipped.values())) == 1  # each bad row, per epoch
    strict = iter(make_dataset(_cfg([{"path": str(f)}], batch=1, strict=True),
                               resolve_file(TOKENIZER)))  # fmt: skip
    with pytest.raises(DataError, match=r"messy.jsonl:\d: .*data.strict"):
        for _ in range(12):
            next(strict)


def test_prose_quoting_speaker_tags_stays_text_and_every_row_trains(tmp_path):
    """Tags within lines, or a user tag alone at a line's start, are prose under `text`."""
    rows = ["In the interview. Q: what did you do? A: I went home.",
            "Log in as user: admin, then the bot: replies. ถาม: ไหม ตอบ: ได้",
            "Notes\nQ: why? A: because the answer sits on the question's line.",
            "Plain prose without any tag at all."]  # fmt: skip
    f = tmp_path / "pretrain.jsonl"
    f.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows))
    assert [getattr(r, "text", r) for r in _records(f)] == rows
    it = iter(make_dataset(_cfg([{"path": str(f)}], batch=1, strict=True),
                           resolve_file(TOKENIZER)))  # fmt: skip
    batches = [next(it) for _ in range(6)]  # every row, read several times over
    assert list(batches[-1]["stats"]["skipped"]) == [0] * len(SKIP_REASONS)
    assert all(np.array_equal(b["loss_mask"], b["segment_ids"] > 0) for b in batches)  # all text


DEEP = '{"text": "x", "meta": ' + "[" * 10_000 + "]" * 10_000 + "}"  # past the parser's recursion


def test_any_error_reading_a_record_is_a_counted_skip_or_one_strict_line(tmp_path):
    """Whatever one record makes its reader raise (RecursionError, TypeError...) costs that record:
    skipped and counted by training and `prepare`, or one DataError naming file:line."""
    good = json.dumps({"text": "สวัสดี hello world"}, ensure_ascii=False)
    bad_role = json.dumps({"messages": [{"role": ["user"], "content": "q"}]})  # unhashable role
    f = tmp_path / "deep.jsonl"
    f.write_text("\n".join([good] * 3 + [DEEP, "[1, 2]", '{"text": 5}', bad_role, good]) + "\n")
    got = _records(f)
    assert [(r.reason, r.where.rsplit(":", 1)[1]) for r in got if isinstance(r, Skip)] == [
        ("malformed_json", "4"), ("missing_field", "5"), ("missing_field", "6"),
        ("missing_field", "7")
    ]  # fmt: skip
    it = iter(make_dataset(_cfg([{"path": str(f)}], batch=1), resolve_file(TOKENIZER)))
    skipped = dict(zip(SKIP_REASONS, [next(it) for _ in range(6)][-1]["stats"]["skipped"],
                       strict=True))  # fmt: skip
    assert skipped["malformed_json"] >= 1 and skipped["missing_field"] >= 3
    deep = tmp_path / "only_deep.jsonl"
    deep.write_text("\n".join([good] * 3 + [DEEP, good]) + "\n")
    strict = iter(make_dataset(_cfg([{"path": str(deep)}], batch=1, strict=True),
                               resolve_file(TOKENIZER)))  # fmt: skip
    with pytest.raises(DataError, match=r"only_deep.jsonl:4: nested too deeply .*data.strict"):
        for _ in range(6):
            next(strict)
    manifest = prepare_source({"path": str(f)}, "data.sources[0]", resolve_file(TOKENIZER),
                              tmp_path / "prepared", workers=1)  # fmt: skip
    assert manifest["documents"] == 4 and manifest["skipped"]["malformed_json"] == 1


def test_a_byte_order_mark_costs_no_record(tmp_path):
    rows = tmp_path / "bom.jsonl"
    rows.write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    assert [d.text for d in _records(rows)] == ["first", "second"]
    text = tmp_path / "bom.txt"
    text.write_bytes(b"\xef\xbb\xbffirst\r\nsecond\n")
    assert [d.text for d in _records(text)] == ["first", "second"]
    assert [d.text for d in _records(text, format="paragraphs")] == ["first\nsecond"]


def _prepared(tmp_path, name, docs, out=None, **kw):
    corpus = tmp_path / f"{name}.jsonl"
    corpus.write_text("\n".join(docs) + "\n")
    out = out or tmp_path / name
    prepare_source({"path": str(corpus)}, "data.sources[0]", resolve_file(TOKENIZER), out,
                   workers=1, **kw)  # fmt: skip
    return out


def test_prepared_shards_must_be_the_ones_their_manifest_lists(tmp_path, monkeypatch):
    """A re-run of prepare, interrupted, leaves no manifest; a manifest that lists other shards
    (of another run) is refused naming the shard; ids past the vocabulary stop at once."""
    pytest.importorskip("array_record")
    monkeypatch.setattr(prepare_module, "RECORDS_PER_SHARD", 4)  # 12 documents: 3 shards
    docs_a = [json.dumps({"text": f"เอกสาร {i} first run"}, ensure_ascii=False) for i in range(12)]
    docs_b = [json.dumps({"text": f"document {i} second run"}) for i in range(12)]
    shards = lambda out: {"path": str(out / "*.array_record")}  # noqa: E731
    a = _prepared(tmp_path, "a", docs_a)
    assert len(_records(**shards(a))) == 12
    with pytest.raises(DataError, match=r"b.jsonl:6: invalid JSON"):  # stops in the second shard
        _prepared(tmp_path, "b", docs_b[:5] + ["{oops"] + docs_b[5:], out=a, strict=True)
    assert (a / "shard-00000-of-00004.array_record").exists()
    with pytest.raises(DataError, match=r"a/manifest.json: missing or unreadable"):
        _records(**shards(a))

    a, b = _prepared(tmp_path, "a", docs_a), _prepared(tmp_path, "b", docs_b)
    (b / "manifest.json").write_bytes((a / "manifest.json").read_bytes())  # the same shard names
    with pytest.raises(DataError, match=r"b/shard-00000-of-00003.array_record: not as .*manifest"):
        _records(**shards(b))

    bad = a / "shard-00001-of-00003.array_record"
    records.write_shard(bad, [records.encode(np.array([5, 8, 70_000]), np.ones(3))] * 4)
    manifest = json.loads((a / "manifest.json").read_text())
    manifest["shards"][1] = records.shard_entry(bad, 4)  # a shard listed as it is, bad ids
    records.write_manifest(a, manifest)
    source = open_source(shards(a), "data.sources[0]")
    assert len(source[3]["tokens"]) > 0  # the last record of the first shard
    with pytest.raises(DataError, match=r"shard-00001-of-00003.array_record\[0\]: token id 70000"):
        source[4]


def test_unusable_file_fails_before_training(tmp_path):
    f = tmp_path / "all_bad.jsonl"
    f.write_text("not json\n" * 5)
    with pytest.raises(DataError, match="all_bad.jsonl: no usable row among the first"):
        open_source({"path": str(f)}, "data.sources[0]")
    with pytest.raises(DataError, match=r"data.sources\[0\]: .*nothing\*.txt' matches no file"):
        open_source({"path": str(tmp_path / "nothing*.txt")}, "data.sources[0]")


def test_parquet_rows_follow_the_schemas(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "chat.parquet"
    table = pa.table({
        "question": [f"คำถาม {i}" for i in range(6)],
        "answer": [f"คำตอบ {i}" for i in range(6)],
    })  # fmt: skip
    pq.write_table(table, f, row_group_size=4)
    docs = _records(f, field_map={"instruction": "question", "output": "answer"})
    assert docs[5].messages[1] == {"role": "assistant", "content": "คำตอบ 5"}
    assert _records(f) == docs  # question/answer is a pair without the map too
    odd = tmp_path / "odd.parquet"
    pq.write_table(pa.table({"frage": ["q"], "antwort": ["a"]}), odd)
    with pytest.raises(DataError, match=r"odd.parquet\[row 0\]: unrecognised row; keys are "):
        _records(odd)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="broken.parquet: not a readable Parquet file"):
        _records(broken)


def test_hf_source_reads_a_local_dataset_like_the_hub(tmp_path):
    """`hf:` goes through datasets.load_dataset exactly as for the hub; here a local dataset
    directory in the form of ZombitX64/ThaiChatbotConversation-style chat rows."""
    pytest.importorskip("datasets")
    d = tmp_path / "thai_chat"
    (d / "data").mkdir(parents=True)
    turns = [[{"from": "human", "value": f"สวัสดี {i}"}, {"from": "gpt", "value": f"ครับ {i}"}]
             for i in range(7)]  # fmt: skip
    rows = [{"conversations": t} for t in turns]
    (d / "data" / "train.jsonl").write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"
    )
    docs = _records(f"hf:{d}:train")
    assert len(docs) == 7 and docs[6].messages[1] == {"role": "assistant", "content": "ครับ 6"}
    with pytest.raises(DataError, match=r"hf:.*missing_ds:train: cannot be loaded"):
        open_source({"path": f"hf:{tmp_path / 'missing_ds'}:train"}, "x")


def test_prepared_shards_train_exactly_like_the_raw_sources(tmp_path):
    pytest.importorskip("array_record")
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(f"document {i} สวัสดี" + " more" * (i % 7) for i in range(300)))
    chat = resolve_file("bundled:chat.jsonl")
    cfg = _cfg([{"path": str(corpus), "weight": 2.0}, {"path": str(chat), "weight": 1.0}],
               seq_len=48, eval_sources=[{"path": str(chat)}])  # fmt: skip
    tok = resolve_file(TOKENIZER)
    result = prepare(cfg, tok, tmp_path / "prepared", workers=2)
    manifest = json.loads((tmp_path / "prepared" / "sources_0" / "manifest.json").read_text())
    assert manifest["documents"] == 300 and manifest["tokenizer_sha256"]
    assert result["sources"][0] == {"path": str(tmp_path / "prepared/sources_0/*.array_record"),
                                    "weight": 2.0}  # fmt: skip
    raw = iter(make_dataset(cfg, tok))
    shards = iter(make_dataset(_cfg(result["sources"], seq_len=48), tok))
    for _ in range(5):
        a, b = next(raw), next(shards)
        for k in ("tokens", "loss_mask", "segment_ids", "positions"):
            np.testing.assert_array_equal(a[k], b[k])

    with pytest.raises(DataError, match="tokenized with another tokenizer"):
        open_source(result["sources"][0], "data.sources[0]", "0" * 64)


def test_tfds_source_reads_a_locally_built_dataset(tmp_path):
    """`tfds:` goes through tfds.data_source exactly as for a downloaded dataset; here one built
    on the spot (ArrayRecord, no TensorFlow needed), with a text config and a chat config."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class HanumanTiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = [
            tfds.core.BuilderConfig(name="text"),
            tfds.core.BuilderConfig(name="chat"),
        ]

        def _info(self):
            turn = {"from": tfds.features.Text(), "value": tfds.features.Text()}
            features = {"text": tfds.features.Text()} if self.builder_config.name == "text" else {
                "conversations": tfds.features.Sequence(turn)
            }  # fmt: skip
            return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,
                                         features=tfds.features.FeaturesDict(features))  # fmt: skip

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(9)}

        def _generate_examples(self, n):
            for i in range(n):
                if self.builder_config.name == "text":
                    yield i, {"text": f"ข้อความ {i}" if i != 4 else ""}
                else:
                    yield i, {"conversations": [{"from": "human", "value": f"ถาม {i}"},
                                                {"from": "gpt", "value": f"ตอบ {i}"}]}  # fmt: skip

    for config in ("text", "chat"):
        HanumanTiny(data_dir=str(tmp_path), config=config).download_and_prepare(
            file_format="array_record"
        )
    texts = _records("tfds:hanuman_tiny/text:train", data_dir=str(tmp_path))
    assert [getattr(r, "text", None) for r in texts][3:6] == ["ข้อความ 3", None, "ข้อความ 5"]
    assert isinstance(texts[4], Skip) and texts[4].reason == "empty"
    chats = _records("tfds:hanuman_tiny/chat:train[:5]", data_dir=str(tmp_path))
    assert len(chats) == 5
    assert chats[2].messages == ({"role": "user", "content": "ถาม 2"},
                                 {"role": "assistant", "content": "ตอบ 2"})  # fmt: skip
    with pytest.raises(DataError, match=r"tfds:no_such_dataset:train: cannot be loaded"):
        _records("tfds:no_such_dataset:train", data_dir=str(tmp_path))
