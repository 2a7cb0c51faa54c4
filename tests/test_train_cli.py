"""End to end: the CLI trains `tiny` for a few steps, logs, checkpoints, and resumes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _train(workdir, *overrides):
    cmd = [
        sys.executable,
        "-m",
        "hanuman_jax.train",
        "--config",
        "configs/tiny.py",
        "--workdir",
        str(workdir),
        "--no_progress",
        "--config.train.log_every=2",
        "--config.train.checkpoint_every=4",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_cli_trains_checkpoints_and_resumes(tmp_path):
    workdir = tmp_path / "run"
    _train(workdir, "--config.train.steps=6")
    rows = _metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2, 4, 6]
    for r in rows:
        assert {"loss", "lr", "tokens_per_s", "grad_norm", "aux_loss", "z_loss"} <= set(r)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4", "6"]
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))

    proc = _train(workdir, "--config.train.steps=8")
    assert "resumed from" in proc.stderr and "at step 6" in proc.stderr
    rows = _metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2, 4, 6, 7, 8]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["6", "8"]
