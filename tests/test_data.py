import json
import re

import ml_collections
import numpy as np
import pytest

from hanuman_jax.data import DataError, make_dataset, read_documents, resolve_file
from hanuman_jax.data.sources import open_source
from hanuman_jax.tokenizer import Tokenizer

TOKENIZER = "bundled:tokenizer.model"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(resolve_file(TOKENIZER))


def _cfg(sources, seq_len=32, batch=4, seed=0, steps=100, **data):
    return ml_collections.ConfigDict(
        {
            "data": {"sources": sources, "seq_len": seq_len, "tokenizer": TOKENIZER,
                     "strict": False, "packing": "concat", "eval_sources": [],
                     "seq_len_schedule": [], **data},
            "train": {"batch_size": batch, "seed": seed, "steps": steps},
        }
    )  # fmt: skip


def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.fixture
def corpus(tmp_path):
    text = tmp_path / "docs.txt"
    docs = [f"document {i} says สวัสดีครับ number {i * 7}" + " and more" * (i % 5) for i in range(40)]
    text.write_text("\n".join(docs[:20]) + "\n\n" + "\n".join(docs[20:]) + "\n")
    chat = tmp_path / "chat.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"คำถาม {i}?"},
                {"role": "assistant", "content": f"answer {i}"},
            ]
        }
        for i in range(10)
    ]
    chat.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return text, chat, docs


def test_read_documents_text_and_jsonl(tmp_path, corpus):
    text, chat, docs = corpus
    assert [d.text for d in read_documents(text)] == docs  # blank lines skipped
    assert read_documents(chat)[3].messages[1] == {"role": "assistant", "content": "answer 3"}
    j = tmp_path / "t.jsonl"
    j.write_text('{"title": "หัวข้อ", "text": "เนื้อหา"}\n{"content": "c"}\n')
    assert [d.text for d in read_documents(j)] == ["หัวข้อ\nเนื้อหา", "c"]


def test_unknown_schemas_and_missing_files_fail_at_once(tmp_path):
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"question": "q", "answer_th": "a"}\n')
    with pytest.raises(
        ValueError,
        match=r"odd.jsonl:1: unrecognised row; keys are \['answer_th', "
        r"'question'\]",
    ):
        read_documents(odd)
    with pytest.raises(DataError, match="matches no file"):
        make_dataset(_cfg([{"path": str(tmp_path / "missing*.txt")}]), resolve_file(TOKENIZER))


def test_packed_batches_hold_whole_documents(corpus, tokenizer):
    text, _, docs = corpus
    it = iter(make_dataset(_cfg([{"path": str(text)}], seq_len=37, batch=3), tokenizer.path))
    seen = set()
    for batch in _take(it, 6):
        assert batch["tokens"].shape == (3, 37) and batch["tokens"].dtype == np.int32
        for row in range(3):
            seg, pos, tok = (batch[k][row] for k in ("segment_ids", "positions", "tokens"))
            assert seg[0] == 1 and np.all(np.diff(seg) >= 0)
            for s in np.unique(seg):
                where = np.flatnonzero(seg == s)
                assert np.array_equal(pos[where], pos[where[0]] + np.arange(len(where)))
                ids = tok[where]
                assert pos[where[0]] == 0  # a split document's tail restarts: RoPE is relative
                if ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id:  # a whole document
                    seen.add(tokenizer.decode(ids[1:-1]))
    assert seen and seen <= set(docs)


def test_chat_trains_only_on_assistant_tokens(corpus, tokenizer):
    _, chat, _ = corpus
    batch = next(
        iter(make_dataset(_cfg([{"path": str(chat)}], seq_len=64, batch=2), tokenizer.path))
    )
    tok, mask = batch["tokens"][0], batch["loss_mask"][0]
    trained = tokenizer.decode(tok[mask == 1])
    assert "answer" in trained and "คำถาม" not in trained and "user" not in trained
    assert 0 < mask.sum() < len(mask)


def test_deterministic_and_resumable(corpus, tokenizer):
    text, chat, _ = corpus
    cfg = _cfg([{"path": str(text), "weight": 3.0}, {"path": str(chat), "weight": 1.0}])
    a = iter(make_dataset(cfg, tokenizer.path))
    b = iter(make_dataset(cfg, tokenizer.path))
    first = _take(a, 4)
    for x, y in zip(first, _take(b, 4), strict=True):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    state = json.loads(json.dumps(a.get_state()))  # survives JSON (it goes into checkpoints)
    expected = _take(a, 5)
    resumed = iter(make_dataset(cfg, tokenizer.path))
    resumed.set_state(state)
    for x, y in zip(expected, _take(resumed, 5), strict=True):
        for k in ("tokens", "segment_ids", "positions", "loss_mask"):
            np.testing.assert_array_equal(x[k], y[k])
        for k in x["stats"]:  # the data counters resume too
            np.testing.assert_array_equal(x["stats"][k], y["stats"][k])
    other = iter(make_dataset(_cfg(cfg.data.sources, seed=1), tokenizer.path))
    assert not np.array_equal(next(other)["tokens"], first[0]["tokens"])


def test_processes_read_disjoint_shards(corpus, tokenizer):
    text, _, _ = corpus
    cfg = _cfg([{"path": str(text)}], seq_len=16, batch=4)
    parts = [
        next(iter(make_dataset(cfg, tokenizer.path, process_index=i, process_count=2)))
        for i in range(2)
    ]
    assert parts[0]["tokens"].shape == (2, 16)
    assert not np.array_equal(parts[0]["tokens"], parts[1]["tokens"])


def test_a_source_reads_its_rows_in_the_shape_of_most_first_rows(tmp_path, tokenizer):
    rows = [
        {"instruction": "แปลเป็นไทย", "input": "hello", "output": "<think>ง่าย</think>สวัสดี"},
        {"instruction": "2+2?", "output": "4"},
        {"prompt": "2+2?", "response": "4"},  # another shape: skipped in this file
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"title": "t", "content": "c"},  # not an SFT row: skipped too
    ]
    f = tmp_path / "mixed_schemas.jsonl"
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    source = open_source({"path": str(f)}, "test")
    records = [source[i] for i in range(len(source))]
    assert [r.reason for r in records[2:]] == ["missing_field"] * 3
    message = records[2].message
    assert "'instruction' is missing or null in this row; its source holds prompt/" in message
    docs = read_documents(f)
    assert docs[0].messages == (
        {"role": "user", "content": "แปลเป็นไทย\n\nhello"},
        {"role": "assistant", "content": "<think>ง่าย</think>สวัสดี"},  # kept verbatim
    )
    assert len(docs) == 2 and docs[1].messages[1] == {"role": "assistant", "content": "4"}
    g = tmp_path / "texts.jsonl"
    g.write_text('{"title": "t", "content": "c"}\n{"text": null}\n{"text": "x"}\n')
    assert [d.text for d in read_documents(g)] == ["t\nc", "x"]  # the empty row is skipped
    batch = next(iter(make_dataset(_cfg([{"path": str(f)}], seq_len=48, batch=2), tokenizer.path)))
    trained = tokenizer.decode(batch["tokens"][0][batch["loss_mask"][0] == 1])
    assert "<think>ง่าย</think>สวัสดี" in trained and "แปลเป็นไทย" not in trained


def test_field_map_and_max_examples(tmp_path, tokenizer):
    f = tmp_path / "own_schema.jsonl"
    rows = [{"frage": f"คำถาม {i}", "antwort": f"คำตอบ {i}", "id": i} for i in range(50)]
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    with pytest.raises(
        DataError,
        match=r"unrecognised row; keys are \['antwort', 'frage', "
        r"'id'\].*field_map",
    ):
        read_documents(f)
    fmap = {"instruction": "frage", "output": "antwort"}
    docs = read_documents(f, fmap)
    assert docs[7].messages[1] == {"role": "assistant", "content": "คำตอบ 7"}
    with pytest.raises(DataError, match=r"field_map names \['reply'\], not in this row"):
        read_documents(f, {"instruction": "frage", "output": "reply"})

    src = {"path": str(f), "field_map": fmap, "max_examples": 10}

    def sampled_ids():
        it = iter(make_dataset(_cfg([src], seq_len=512, batch=2), tokenizer.path))
        text = tokenizer.decode(next(it)["tokens"].reshape(-1))  # ~2.5 epochs of 10 documents
        return {int(x) for x in re.findall(r"คำถาม (\d+)", text)}

    ids = sampled_ids()
    assert len(ids) == 10 and ids == sampled_ids()  # exactly 10 documents, the same each time
    assert ids != set(range(10))  # a seeded sample of the 50, not the first 10


def test_mixture_weights_are_token_shares_within_2_percent(tmp_path, tokenizer):
    """Over 10k sequences each source's share of tokens is its weight, although one source's
    documents are ~20x longer than another's (a document-count mixture would be far off)."""
    short = tmp_path / "short.txt"
    short.write_text("\n".join(f"สั้น {i}" for i in range(500)) + "\n")
    long = tmp_path / "long.txt"
    long.write_text("\n".join(f"long document {i} " + "word " * 60 for i in range(200)) + "\n")
    chat = resolve_file("bundled:chat.jsonl")
    weights = [0.5, 0.3, 0.2]
    paths = (short, long, chat)
    sources = [{"path": str(p), "weight": w} for p, w in zip(paths, weights, strict=True)]
    it = iter(make_dataset(_cfg(sources, seq_len=128, batch=16), tokenizer.path))
    batches = [next(it) for _ in range(10_000 // 16)]
    stats = batches[-1]["stats"]
    placed = stats["source_tokens"]
    assert placed.sum() + stats["padding"] == 10_000 * 128  # every token is accounted for
    shares = placed / placed.sum()
    np.testing.assert_allclose(shares, weights, atol=0.02)
    bos = sum(int((b["tokens"] == tokenizer.bos_id).sum()) for b in batches)
    assert bos > 10_000  # many documents per row: the short source really is short


def test_global_batch_does_not_depend_on_the_process_count(corpus, tokenizer):
    text, chat, _ = corpus
    cfg = _cfg([{"path": str(text)}, {"path": str(chat), "weight": 0.5}], seq_len=24, batch=4)
    whole = iter(make_dataset(cfg, tokenizer.path))
    halves = [iter(make_dataset(cfg, tokenizer.path, process_index=i, process_count=2))
              for i in range(2)]  # fmt: skip
    quarters = [iter(make_dataset(cfg, tokenizer.path, process_index=i, process_count=4))
                for i in range(4)]  # fmt: skip
    for _ in range(3):
        want = next(whole)
        for parts in (halves, quarters):
            got = [next(p) for p in parts]
            for k in ("tokens", "segment_ids", "positions", "loss_mask"):
                np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k])


def test_whole_packing_keeps_conversations_in_one_row(corpus, tokenizer):
    _, chat, _ = corpus
    cfg = _cfg([{"path": str(chat)}], seq_len=64, batch=2, packing="whole")
    it = iter(make_dataset(cfg, tokenizer.path))
    for batch in _take(it, 5):
        for row in range(2):
            tok, seg = batch["tokens"][row], batch["segment_ids"][row]
            used = seg > 0
            n = int(used.sum())
            assert n > 0 and used[:n].all() and not used[n:].any()  # padding only at the end
            for s in np.unique(seg[used]):
                ids = tok[seg == s]
                assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id  # whole
            assert np.all(tok[~used] == 0)
    assert batch["stats"]["padding"] > 0


def test_seq_len_schedule_keeps_tokens_per_batch_the_data_order_and_resumes(corpus, tokenizer):
    text, chat, _ = corpus
    sources = [{"path": str(text)}, {"path": str(chat), "weight": 0.5}]
    schedule = [(0.0, 8), (0.3, 16), (0.6, 32)]  # 10 steps: rows of 8 for steps 0-2, 16 for 3-5
    cfg = _cfg(sources, seq_len=32, batch=2, steps=10, seq_len_schedule=schedule)
    plain = _take(iter(make_dataset(_cfg(sources, seq_len=32, batch=2), tokenizer.path)), 10)
    it = iter(make_dataset(cfg, tokenizer.path))
    batches = _take(it, 4)
    state = json.loads(json.dumps(it.get_state()))
    batches += _take(it, 6)
    lengths = [8] * 3 + [16] * 3 + [32] * 4
    for i, (b, n) in enumerate(zip(batches, lengths, strict=True)):
        assert b["tokens"].shape == (2 * 32 // n, n), i
        assert b["positions"].max() < n
    for lane in range(2):  # each lane's rows, end to end, hold the very tokens of the plain run
        rows = [b["tokens"].reshape(2, -1)[lane] for b in batches]
        want = [b["tokens"][lane] for b in plain]
        np.testing.assert_array_equal(np.concatenate(rows), np.concatenate(want))
    np.testing.assert_array_equal(batches[-1]["stats"]["source_tokens"],
                                  plain[-1]["stats"]["source_tokens"])  # fmt: skip
    resumed = iter(make_dataset(cfg, tokenizer.path))
    resumed.set_state(state)
    for x, y in zip(batches[4:], _take(resumed, 6), strict=True):
        for k in ("tokens", "segment_ids", "positions", "loss_mask"):
            np.testing.assert_array_equal(x[k], y[k])
    halves = [iter(make_dataset(cfg, tokenizer.path, process_index=i, process_count=2))
              for i in range(2)]  # fmt: skip
    for want in batches:
        got = np.concatenate([next(h)["tokens"] for h in halves])
        np.testing.assert_array_equal(got, want["tokens"])


def test_seq_len_schedule_phases_start_at_their_fraction_of_the_steps():
    from hanuman_jax.data.schedule import SeqLenSchedule

    cfg = _cfg([], seq_len=128, steps=100, seq_len_schedule=[(0.0, 32), (0.29, 64), (0.5, 128)])
    schedule = SeqLenSchedule.from_config(cfg)
    assert schedule.phases == ((0, 32), (29, 64), (50, 128))  # 0.29 x 100 is 28.999... in floats
    assert [schedule.length(s) for s in (0, 28, 29, 49, 50, 99)] == [32, 32, 64, 64, 128, 128]
    assert [schedule.rows_per_lane(s) for s in (0, 29, 50)] == [4, 2, 1]
    assert SeqLenSchedule.from_config(_cfg([], seq_len=128)).phases == ((0, 128),)
