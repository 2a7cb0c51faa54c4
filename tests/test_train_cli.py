"""End to end: the CLI trains `tiny`, logs, checkpoints, and resumes exactly where it stopped."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXACT = ("loss", "grad_norm", "aux_loss", "z_loss", "lr", "tokens", "total_loss")


def _cmd(workdir, *overrides):
    return [
        sys.executable,
        "-m",
        "hanuman_jax.train",
        "--config",
        "configs/tiny.py",
        "--workdir",
        str(workdir),
        "--no-progress",
        "--config.train.log_every=2",
        "--config.train.checkpoint_every=4",
        "--config.train.steps=8",
        "--config.train.eval_every=4",
        "--config.train.eval_batches=2",
        "--config.data.eval_sources=[{'path': 'bundled:mixed.txt'}]",
        *overrides,
    ]


def _env(devices=None, cache=None):
    """CPU; `cache`: a directory where the runs of one test share their compilations."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if cache:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    return env


def _train(workdir, *overrides, expect=0, devices=None, cache=None):
    proc = subprocess.run(_cmd(workdir, *overrides), cwd=ROOT, env=_env(devices, cache),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def _start(workdir, *overrides, cache=None):
    """The CLI in the background, its output in `workdir`.log."""
    log = open(f"{workdir}.log", "w")  # noqa: SIM115 (the child holds it)
    return subprocess.Popen(_cmd(workdir, *overrides), cwd=ROOT, env=_env(cache=cache),
                            stdout=log, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _wait_for(condition, proc, what, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None or condition(), f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.02)


def _metrics(workdir):
    """Training rows by step, their steps in file order, and evaluation rows by step."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    evals = {r["step"]: r for r in rows if "eval_loss" in r}
    assert len(train) + len(evals) == len(rows)
    return {r["step"]: r for r in train}, [r["step"] for r in train], evals


def _params(step_dir):
    return ocp.StandardCheckpointer().restore(step_dir.absolute() / "state")["params"]


@pytest.mark.slow
def test_cli_trains_checkpoints_and_resumes_exactly_after_sigkill(tmp_path):
    workdir, cache, every_step = tmp_path / "run", tmp_path / "xla", "--config.train.log_every=1"
    _train(workdir, every_step, cache=cache)
    first, steps, first_evals = _metrics(workdir)
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
    for row in first.values():
        assert {"loss", "lr", "tokens_per_s", "grad_norm", "aux_loss", "z_loss"} <= set(row)
        assert row["packing_efficiency"] == 1.0 and row["data/skipped_malformed_json"] == 0
    assert 0 < first[8]["data/source_3_token_share"] < 0.2  # chat: weight 0.1 (±2%: test_data)
    assert (
        sorted(first_evals) == [4, 8] and first_evals[8]["eval_loss"] < first_evals[4]["eval_loss"]
    )
    assert first_evals[8]["eval_tokens"] > 0
    ckpts = workdir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["4", "8"]
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["train"]["steps"] == 8
    assert saved["model"]["vocab_size"] == 4096  # tiny says 0: taken from its tokenizer

    # SIGKILL (no chance to clean up) once step 4 is saved; the rerun must redo 5-8 identically,
    # which needs the parameters, optimizer state, step, RNG and data position all restored.
    killed = tmp_path / "killed"
    proc = _start(killed, every_step, cache=cache)
    _wait_for((killed / "checkpoints" / "4").is_dir, proc, "checkpoint 4")
    proc.kill()
    assert proc.wait() == -signal.SIGKILL and not (killed / "checkpoints" / "8").exists()
    proc = _train(killed, every_step, cache=cache)
    assert f"resumed from {killed / 'checkpoints' / '4'} at step 4" in proc.stderr
    again, steps, evals = _metrics(killed)
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]  # each step once: rows after step 4 were replaced
    for step in steps:
        assert {k: again[step][k] for k in EXACT} == {k: first[step][k] for k in EXACT}
    assert evals == first_evals
    want, got = _params(ckpts / "8"), _params(killed / "checkpoints" / "8")
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)

    proc = _train(workdir)
    assert "already at step 8 of 8: nothing to do" in proc.stderr

    proc = _train(workdir, "--config.model.d_model=64", expect=2)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "different model (model.d_model=128 there, 64 now" in lines[0]


def test_sigterm_finishes_the_step_saves_and_exits_0(tmp_path, tmp_path_factory):
    from hanuman_jax.checkpoint.files import damage

    workdir = tmp_path / "run"
    small = ("--config.model.num_layers=2", "--config.model.d_model=64",
             "--config.data.seq_len=64", "--config.train.batch_size=4",
             "--config.train.log_every=1", "--config.train.steps=100000",
             "--config.train.checkpoint_every=100000", "--config.data.eval_sources=[]",
             "--config.train.eval_every=0")  # fmt: skip
    proc = _start(workdir, *small, cache=tmp_path_factory.getbasetemp() / "xla")  # as in-process
    metrics = workdir / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, proc, "step 2")
    proc.send_signal(signal.SIGTERM)
    log = Path(f"{workdir}.log")
    _wait_for(lambda: "SIGTERM: stopping after this step" in log.read_text(), proc, "a reply")
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)  # a second signal: the save must still complete
    assert proc.wait(timeout=300) == 0
    log = log.read_text()
    found = re.search(r"stopped by SIGTERM: saved step (\d+) to (\S+);", log)
    assert found, log[-3000:]
    step = int(found[1])
    assert Path(found[2]) == workdir / "checkpoints" / str(step) and damage(Path(found[2])) is None
    _, steps, _ = _metrics(workdir)
    assert step >= 2 and steps == list(range(1, step + 1))


def test_strict_data_stops_at_the_bad_line_and_keeps_the_steps_done(tmp_path):
    messy = tmp_path / "messy.jsonl"
    good = [json.dumps({"text": f"เอกสาร {i} document number {i}"}, ensure_ascii=False)
            for i in range(400)]  # fmt: skip
    messy.write_text("\n".join(good[:300] + ['{"text": oops'] + good[300:]) + "\n")
    source = f"--config.data.sources=[{{'path': '{messy}'}}]"
    proc = _train(tmp_path / "strict", source, "--config.data.strict=true", expect=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "messy.jsonl:301: invalid JSON" in errors[0], proc.stderr[-2000:]
    saved = sorted(int(p.name) for p in (tmp_path / "strict" / "checkpoints").iterdir())
    assert saved and saved[-1] >= 1  # the steps before the bad batch were saved

    no_eval = ("--config.data.eval_sources=[]", "--config.train.eval_every=0")
    proc = _train(tmp_path / "lenient", source, "--config.train.steps=4", *no_eval)
    rows, _, _ = _metrics(tmp_path / "lenient")
    assert rows[4]["data/skipped_malformed_json"] >= 1
    assert "unusable records skipped" in proc.stderr


@pytest.mark.slow
def test_cli_mesh_overrides_on_8_devices_match_one_device(tmp_path):
    short = (
        "--config.train.steps=4",
        "--config.data.eval_sources=[]",
        "--config.train.eval_every=0",
    )
    mesh = ("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.expert=2")
    _train(tmp_path / "mesh", *short, *mesh, devices=8)
    _train(tmp_path / "one", *short, devices=1)
    (sharded, _, _), (single, _, _) = _metrics(tmp_path / "mesh"), _metrics(tmp_path / "one")
    assert sorted(sharded) == sorted(single) == [1, 2, 4]
    for step in single:
        assert sharded[step]["loss"] == pytest.approx(single[step]["loss"], rel=1e-5)


def test_distributed_two_processes_match_one(tmp_path):
    """`--distributed`: two CLI processes x 4 devices (gloo on 127.0.0.1) train like one x 8, the
    experts split across the two processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    small = ("--config.train.steps=3", "--config.train.log_every=1", "--config.model.num_layers=2",
             "--config.data.seq_len=32", "--config.train.batch_size=8",
             "--config.data.eval_sources=[]", "--config.train.eval_every=0",
             "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.expert=2")  # fmt: skip
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4"
    )
    cmd = [sys.executable, "-m", "hanuman_jax.train", "--config", "configs/tiny.py", "--workdir",
           str(tmp_path / "multi"), "--no-progress", *small, "--distributed",
           "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2"]  # fmt: skip
    procs = [
        subprocess.Popen(
            [*cmd, "--process-id", str(i)],
            cwd=ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    _train(tmp_path / "one", *small, devices=8)
    (multi, steps, _), (one, _, _) = _metrics(tmp_path / "multi"), _metrics(tmp_path / "one")
    assert steps == [1, 2, 3]
    for step in steps:
        assert multi[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5)
        assert multi[step]["tokens"] == one[step]["tokens"]


def test_cluster_flags_need_distributed(tmp_path, capsys):
    from hanuman_jax.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--config", "configs/tiny.py", "--process-id", "1"])
    assert "--process-id only apply with --distributed" in capsys.readouterr().err
    # the underscore spelling of before is still accepted
    args, _ = parse_args(["--config", "tiny", "--distributed", "--num_processes", "2"])
    assert args.distributed and args.num_processes == 2 and args.coordinator_address is None
    # no cluster to detect here: one line saying what to pass, not a traceback
    proc = _train(tmp_path / "alone", "--distributed", expect=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--coordinator-address HOST:PORT" in errors[0], proc.stderr
