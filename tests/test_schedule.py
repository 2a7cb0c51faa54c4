"""The trainer under `data.seq_len_schedule`: one compilation per length, resumable mid-schedule."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hanuman_jax.config import ConfigError, load_config
from hanuman_jax.data.schedule import (
    SeqLenSchedule,
    check_phase_starts,
    check_seq_len_schedule,
    phase_start,
)
from hanuman_jax.training import loop as trainer

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("shared_compile_cache")


def _rows(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {row["step"]: row for row in map(json.loads, lines) if "loss" in row}


def test_each_length_compiles_once_and_a_resume_goes_on_in_its_phase(tmp_path, monkeypatch):
    steps = []  # every jitted train step the trainer builds

    def recording(setup, _jit=trainer.jit_train_step):
        steps.append(_jit(setup))
        return steps[-1]

    monkeypatch.setattr(trainer, "jit_train_step", recording)
    cfg = load_config(ROOT / "configs" / "tiny.py", [
        "--config.model.num_layers=2", "--config.model.d_model=64", "--config.data.seq_len=64",
        "--config.train.batch_size=4", "--config.train.grad_accum_steps=2",
        "--config.train.log_every=1", "--config.train.steps=6", "--config.train.checkpoint_every=3",
        # steps 0-2 in rows of 16 (16 rows a batch), 3 in rows of 32, 4-5 in rows of 64
        "--config.data.seq_len_schedule=[(0.0, 16), (0.5, 32), (0.75, 64)]",
    ])  # fmt: skip
    run = tmp_path / "run"
    trainer.train(cfg, run, progress=False)
    assert steps[0]._cache_size() == 3  # one compilation per length, none per step
    first = _rows(run)
    assert [first[s]["seq_len"] for s in range(1, 7)] == [16, 16, 16, 32, 64, 64]
    # no row is charged with a new length's compilation (row 1 holds the first one)
    speeds = [first[s]["tokens_per_s"] for s in range(2, 7)]
    # a compile is hundreds of steps here; against the median, one fast row on a loaded host
    # (or a checkpoint hashed in the background) cannot make a row look charged with one
    assert min(speeds) > np.median(speeds) / 30, speeds

    shutil.rmtree(run / "checkpoints" / "6")
    trainer.train(cfg, run, progress=False)  # resumes at step 3: one step of 32, two of 64
    assert steps[1]._cache_size() == 2
    again = _rows(run)
    for s in (4, 5, 6):
        np.testing.assert_allclose(again[s]["loss"], first[s]["loss"], rtol=1e-6)
        assert again[s]["seq_len"] == first[s]["seq_len"]


def test_phases_start_where_the_fractions_say():
    assert phase_start(0.29, 100) == 29  # 0.29 x 100 is 28.999999999999996 in floating point
    phases = "--config.data.seq_len_schedule=[(0, 32), (0.29, 64), (0.5, 128)]"
    cfg = load_config(ROOT / "configs" / "tiny.py", [phases])
    schedule = SeqLenSchedule.from_config(cfg)  # 300 steps
    assert schedule.phases == ((0, 32), (87, 64), (150, 128)) and schedule.starts() == [87, 150]
    assert [schedule.rows_per_lane(s) for s in (0, 86, 87, 149, 150)] == [4, 4, 2, 2, 1]
    check_seq_len_schedule([], 128)
    check_phase_starts([(0.0, 64), (0.5, 128)], 2)  # one step each
    with pytest.raises(ConfigError, match=r"\[1\]=\(0.4, 128\) is invalid: starts at step 0"):
        check_phase_starts([(0.0, 64), (0.4, 128)], 1)
