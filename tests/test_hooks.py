"""The train loop's hooks, each run alone: no model, no compile, no training run."""

import json
import math

import numpy as np
import pytest

from hanuman_jax.data.schedule import SeqLenSchedule
from hanuman_jax.training.hooks import EvalHook, Hook, MetricsLog, Run, SampleHook, Saver
from hanuman_jax.training.metrics import MetricsWriter, ProgressBar


def _stats(tokens: int) -> dict:
    return {"skipped": np.zeros(4, np.int64), "source_tokens": np.array([tokens, 0], np.int64),
            "padding": np.int64(3)}  # fmt: skip


def _metrics(step: int, in_a_row: int = 0) -> dict:
    return {"loss": np.float32(10.0 / step), "nonfinite_in_a_row": np.int32(in_a_row)}


def _rows(workdir, name="metrics.jsonl"):
    path = workdir / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def logged(tmp_path):
    """A MetricsLog over steps 2..9 of a run resumed at step 2, a row every 3 steps."""
    writer = MetricsWriter(tmp_path, resume_step=2)
    metrics = MetricsLog(writer, ProgressBar(9, 2, enabled=False),
                         SeqLenSchedule(64, ((0, 16), (5, 64))), start=2, end=9, every=3,
                         tokens_per_step=256)  # fmt: skip
    yield metrics, writer
    writer.close()


def test_hook_due_every_n_steps_at_the_end_and_at_a_stop():
    hook, saver, never = Hook(print, 4), Hook(print, 4, at_stop=True), Hook(print, 0)
    assert [s for s in range(1, 11) if hook.due(s, 10, stopping=False)] == [4, 8, 10]
    assert not any(never.due(s, 10, stopping=False) for s in range(1, 11))
    assert not hook.due(4, 10, stopping=True)  # a stopping run saves and does nothing else
    assert saver.due(3, 10, stopping=True) and not never.due(3, 10, stopping=True)


def test_metrics_rows_are_read_one_step_late(tmp_path, logged):
    metrics, _ = logged
    run = Run(state={}, step=2, saved=2)
    for step in range(3, 10):
        run.step = step
        metrics.push(run, _metrics(step, in_a_row=step % 2), _stats(100 * step))
        # the step just pushed is not read: its device work may still be running
        assert [r["step"] for r in _rows(tmp_path)] == [s for s in (3, 6) if s < step]
        assert run.in_a_row == (0 if step == 3 else (step - 1) % 2)  # the step before's
    metrics.flush(run)
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [3, 6, 9]  # the first, every 3rd and the last
    assert [r["seq_len"] for r in rows] == [16, 64, 64]  # the length the row's step ran at
    assert rows[2]["loss"] == pytest.approx(10 / 9) and rows[2]["data/source_0_token_share"] == 1
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert run.last["step"] == 9 and run.last["loss"] == pytest.approx(10 / 9)
    assert run.data_stats["source_tokens"][0] == 900 and run.in_a_row == 1
    metrics.flush(run)  # nothing held: no second row
    assert len(_rows(tmp_path)) == 3


def test_a_restarted_timing_leaves_the_compile_out_of_the_row(logged, tmp_path):
    metrics, _ = logged
    run = Run(state={}, step=3, saved=2)
    metrics.push(run, _metrics(3), _stats(1))
    metrics.flush(run)
    metrics.t_mark -= 1000.0  # as if the next step compiled for 1000 s ...
    metrics.restart_timing(3)  # ... and the loop restarted the timing after it
    run.step = 4
    metrics.push(run, _metrics(4), _stats(2))
    metrics.flush(run)  # step 4 is not a row (every 3): the timing runs on to step 6
    run.step = 6
    metrics.push(run, _metrics(6), _stats(3))
    metrics.flush(run)
    assert _rows(tmp_path)[-1]["tokens_per_s"] > 3 * 256 / 100  # not charged the 1000 s


class _Checkpoints:
    def __init__(self, workdir):
        self.workdir, self.saves = workdir, []

    def save(self, step, state, position, meta):
        rows = [r["step"] for r in _rows(self.workdir)]
        self.saves.append((step, state, position, meta, rows))
        return 0.0


class _Batches:
    def get_state(self):
        return {"at": "now"}


def test_saver_writes_the_metrics_row_before_the_checkpoint(tmp_path, logged):
    metrics, _ = logged
    ckpt = _Checkpoints(tmp_path)
    save = Saver(ckpt, {"version": "x"}, _Batches(), metrics)
    run = Run(state={"params": 1}, step=3, saved=2)
    metrics.push(run, _metrics(3), _stats(1))
    save(run)
    assert ckpt.saves == [(3, {"params": 1}, {"at": "now"}, {"version": "x"}, [3])]
    assert run.saved == 3
    run.step = 4
    save(run, position={"at": "before step 4's batch"})
    assert ckpt.saves[-1][0] == 4 and ckpt.saves[-1][2] == {"at": "before step 4's batch"}


def test_eval_hook_writes_an_eval_row_after_the_steps_train_row(tmp_path, logged):
    metrics, writer = logged
    seen = []

    def evaluate(params):
        seen.append(params)
        return {"loss": 2.0, "perplexity": math.exp(2.0), "bits_per_byte": 0.5, "tokens": 77}

    run = Run(state={"params": "p", "opt": "o"}, step=3, saved=2)
    metrics.push(run, _metrics(3), _stats(1))
    EvalHook(evaluate, writer, metrics)(run)
    assert seen == ["p"]
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [3, 3] and "loss" in rows[0]
    assert rows[1] == {"step": 3, "eval_loss": 2.0, "eval_perplexity": math.exp(2.0),
                       "eval_bits_per_byte": 0.5, "eval_tokens": 77}  # fmt: skip
    assert run.last["eval_loss"] == 2.0 and run.last["loss"] == pytest.approx(10 / 3)


def test_sample_hook_appends_to_samples_jsonl(tmp_path, logged):
    _, writer = logged
    hook = SampleHook(lambda params: [("สวัสดี", f"{params}!"), ("Hi", "there")], writer)
    hook(Run(state={"params": "p"}, step=5, saved=2))
    assert _rows(tmp_path, "samples.jsonl") == [
        {"step": 5, "prompt": "สวัสดี", "text": "p!"},
        {"step": 5, "prompt": "Hi", "text": "there"},
    ]


@pytest.mark.parametrize(
    "tail", [b'{"step": 3, "text": "\xe0\xb8', b"\x00" * 9], ids=["cut-character", "zero-filled"]
)
def test_a_resume_drops_later_rows_and_what_a_kill_left_torn(tmp_path, tail):
    """Both logs, cut in the middle of a character or ending in zeros (a crash before the disk
    caught up): the rows up to the resumed step stay, and the next row starts a line of its own."""
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows)
                                             + tail)  # fmt: skip
    sample = {"step": 2, "prompt": "กรุง", "text": "เทพ\u2028\x85"}  # kept raw by ensure_ascii=False
    sample_line = json.dumps(sample, ensure_ascii=False).encode()
    (tmp_path / "samples.jsonl").write_bytes(sample_line + b"\n" + tail)
    writer = MetricsWriter(tmp_path, resume_step=2)
    writer.write(3, {"loss": 0.25})
    writer.write_samples(3, [("Hi", "there")])
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_bytes().split(b"\n")
    assert [json.loads(line) for line in lines[:-1]] == [*rows[:2], {"step": 3, "loss": 0.25}]
    assert (tmp_path / "samples.jsonl").read_bytes() == sample_line + b"\n" + json.dumps(
        {"step": 3, "prompt": "Hi", "text": "there"}
    ).encode() + b"\n"
