import json

import grain
import numpy as np

from hanuman_jax.data.packing import PackedRows

LENGTHS = [5, 3, 8, 1, 12, 4, 4, 7, 2, 9, 0, 6]  # rows of 8 end on document boundaries often


def _docs():
    start = 0
    docs = []
    for n in LENGTHS:
        tokens = np.arange(start, start + n, dtype=np.int32)
        docs.append({"tokens": tokens, "loss_mask": (tokens % 3 != 0).astype(np.int32)})
        start += n
    return docs


def _dataset():
    return PackedRows(grain.MapDataset.source(_docs()).repeat(3).to_iter_dataset(), 8)


def test_rows_are_the_documents_end_to_end():
    it = iter(_dataset())
    rows = [next(it) for _ in range(sum(LENGTHS) // 8)]
    tokens = np.concatenate([r["tokens"] for r in rows])
    np.testing.assert_array_equal(tokens, np.arange(len(tokens)))
    np.testing.assert_array_equal(
        np.concatenate([r["loss_mask"] for r in rows]), (tokens % 3 != 0).astype(np.int32)
    )
    first = rows[0]  # documents 5 + 3 fill the first row exactly
    np.testing.assert_array_equal(first["segment_ids"], [1] * 5 + [2] * 3)
    np.testing.assert_array_equal(first["positions"], [0, 1, 2, 3, 4, 0, 1, 2])
    second = rows[1]  # document of 8 exactly
    np.testing.assert_array_equal(second["segment_ids"], [1] * 8)
    third = rows[2]  # 1, then the first 7 of 12
    np.testing.assert_array_equal(third["segment_ids"], [1] + [2] * 7)
    np.testing.assert_array_equal(rows[3]["positions"][:5], np.arange(5))  # the tail restarts


def test_resume_from_every_position_is_exact():
    it = iter(_dataset())
    reference = [next(it) for _ in range(20)]
    for k in range(15):
        it = iter(_dataset())
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        resumed = iter(_dataset())
        resumed.set_state(state)
        for want in reference[k : k + 5]:
            got = next(resumed)
            got.update(got.pop("stats"))
            want = {**want, **want["stats"]}
            del want["stats"]
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"resume at {k}")
