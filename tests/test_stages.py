"""Stages A -> B -> C at tiny size: each starts from the previous one's parameters only."""

import json
import logging
import math
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hanuman_jax import sharding
from hanuman_jax.checkpoint.manager import CheckpointError
from hanuman_jax.checkpoint.restore import load_params
from hanuman_jax.config import load_config
from hanuman_jax.data import make_dataset
from hanuman_jax.plot import read_metrics
from hanuman_jax.training.loop import train
from hanuman_jax.training.step import build_setup, loss_fn

ROOT = Path(__file__).resolve().parents[1]
SMALL = ("--config.model.num_layers=2", "--config.model.d_model=64", "--config.data.seq_len=64",
         "--config.train.batch_size=4", "--config.train.log_every=1",
         "--config.train.checkpoint_every=2")  # fmt: skip


pytestmark = pytest.mark.usefixtures("shared_compile_cache")  # runs share compilations


def _cfg(config, *extra):
    return load_config(ROOT / "configs" / config, [*SMALL, *extra])


def _rows(workdir):
    """A step's training and evaluation rows, merged."""
    rows = {}
    for row in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()):
        rows.setdefault(row["step"], {}).update(row)
    return rows


def _held_out(row) -> float:
    """The row's held-out bits per byte, checked against its loss, tokens and bytes."""
    nats = row["eval_loss"] * row["eval_tokens"]
    assert row["eval_bits_per_byte"] == pytest.approx(nats / math.log(2) / row["eval_bytes"])
    return row["eval_bits_per_byte"]


def _state(workdir, step):
    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")


def test_stages_a_b_c_each_start_from_the_last_ones_parameters(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hanuman_jax")
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    train(_cfg("tiny.py", "--config.train.steps=6", "--config.train.keep_checkpoints=3"), a,
          progress=False)  # fmt: skip
    # tiny evaluates on the held-out split at the end; the plot draws it with the training loss
    assert [s for s, r in _rows(a).items() if "eval_loss" in r] == [6]
    assert 0.5 < _held_out(_rows(a)[6]) < 6 and (a / "metrics.png").is_file()
    assert [r["step"] for r in read_metrics(a / "metrics.jsonl")[1]] == [6]

    cfg_b = _cfg("tiny_stage_b.py", "--config.train.steps=4", f"--config.train.init_from={a}",
                 "--config.train.profile_steps=5")  # fmt: skip
    train(cfg_b, b, progress=False)
    assert "train.profile_steps=5: only steps 2-4 are left to trace" in caplog.text
    assert "profile of steps 2-4 written to" in caplog.text
    assert list((b / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert f"initialised the parameters from {a / 'checkpoints' / '6'} (step 6)" in caplog.text
    # step 1 of B ran on A's final parameters: its loss is theirs on B's first batch
    params = load_params(a).params
    batch = next(iter(make_dataset(cfg_b, ROOT / "hanuman_jax/assets/sample/tokenizer.model",
                                   process_index=0, process_count=1, prefetch=0)))  # fmt: skip
    batch.pop("stats")
    setup = build_setup(cfg_b, sharding.make_mesh(cfg_b.mesh))
    loss = float(loss_fn(setup, params, jax.tree.map(np.asarray, batch), None)[1]["loss"])
    rows = _rows(b)
    assert sorted(rows) == [1, 2, 3, 4] and rows[1]["loss"] == pytest.approx(loss, rel=1e-5)
    assert rows[4]["data/source_0_token_share"] > 0.5  # Thai-heavy (A's: 0.3)
    assert rows[1]["lr"] == pytest.approx(cfg_b.optimizer.peak_lr)  # a fresh schedule
    assert [s for s, r in rows.items() if "eval_loss" in r] == [4] and _held_out(rows[4]) > 0
    state = _state(b, 4)
    leaves = jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
    counts = [int(v) for k, v in leaves if "count" in jax.tree_util.keystr(k)]
    assert int(state["step"]) == 4 and counts and set(counts) == {4}  # a fresh optimizer

    cfg_c = _cfg("tiny_stage_c.py", "--config.train.steps=2", f"--config.train.init_from={b}",
                 "--config.train.sample_every=1", "--config.train.sample_tokens=4",
                 "--config.train.sample_prompts=['Hello', 'สวัสดี']")  # fmt: skip
    train(cfg_c, c, progress=False)
    samples = [json.loads(r) for r in (c / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in samples] == [
        (1, "Hello"), (1, "สวัสดี"), (2, "Hello"), (2, "สวัสดี")]  # fmt: skip
    assert all(isinstance(r["text"], str) for r in samples)
    assert f"initialised the parameters from {b / 'checkpoints' / '4'} (step 4)" in caplog.text
    rows = _rows(c)
    assert [s for s, r in rows.items() if "eval_loss" in r] == [2] and _held_out(rows[2]) > 0
    assert rows[2]["data/padding_share"] > 0  # whole chats: rows are padded, never split
    assert rows[2]["tokens"] < 0.8 * 4 * 63  # prompts are masked out of the loss
    assert (c / "checkpoints" / "2" / "tokenizer" / "tokenizer.model").is_file()

    wrong = _cfg("tiny_stage_c.py", "--config.model.d_model=32", f"--config.train.init_from={b}")
    with pytest.raises(CheckpointError, match=r"another shape \(embed is \(4096, 64\) "
                       r"there, \(4096, 32\) now.*model.d_model=64 there, 32 now"):  # fmt: skip
        train(wrong, tmp_path / "wrong", progress=False)
    missing = _cfg("tiny_stage_c.py", f"--config.train.init_from={tmp_path / 'nowhere'}")
    with pytest.raises(CheckpointError, match=r"train.init_from=.*nowhere does not exist"):
        train(missing, tmp_path / "missing", progress=False)


def test_a_profile_with_no_step_to_trace_says_so(tmp_path, caplog):
    from hanuman_jax.training.loop import Profiler

    profiler = Profiler(tmp_path, start=0, count=3, end=1)  # a one-step run: the step compiles
    for step in range(1):
        profiler.before(step)
        profiler.after(step, None)
    profiler.close()
    assert "train.profile_steps=3: no step is left to trace" in caplog.text
    assert not list(tmp_path.iterdir())
