"""One trainer per workdir (workdir.py's lock), however the one before it ended."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hanuman_jax.config import ConfigError, load_config
from hanuman_jax.training import workdir
from hanuman_jax.training.loop import train
from hanuman_jax.training.workdir import hold

ROOT = Path(__file__).resolve().parents[1]
HOLDER = """import sys, time
from pathlib import Path
from hanuman_jax.training.workdir import hold
with hold(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(300)
"""


@pytest.fixture
def holder(tmp_path):
    """(workdir, process): another process holding the workdir, SIGKILLed at the end."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline() == "held\n"
    yield run, proc
    proc.kill()
    proc.wait()


def test_a_second_trainer_on_a_held_workdir_is_refused_in_one_line(holder):
    run, proc = holder
    cli = subprocess.run(
        [sys.executable, "-m", "hanuman_jax.train", "--config", "configs/tiny.py", "--workdir",
         str(run), "--no-progress", "--config.train.steps=1"],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert cli.returncode == 2, cli.stderr[-3000:]
    errors = [line for line in cli.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, cli.stderr[-3000:]
    assert f"--workdir {run} is in use by another trainer (pid {proc.pid} on host " \
           f"{socket.gethostname()}, since " in errors[0]  # fmt: skip
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing read or written


def test_a_sigkilled_holder_does_not_block_the_next_run(holder):
    run, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((run / ".lock").read_text())["pid"] == proc.pid  # its record stays
    cfg = load_config(ROOT / "configs" / "tiny.py", ["--config.data.tokenizer=missing.model"])
    with pytest.raises(ConfigError, match="data.tokenizer"):  # the check after the lock
        train(cfg, run, progress=False)
    assert (run / ".lock").read_text() == ""  # released and emptied as train() ended


def test_each_process_of_a_run_holds_its_own_lock_and_a_second_hold_is_refused(tmp_path):
    with hold(tmp_path, 0), hold(tmp_path, 1) as second:
        assert second.name == ".lock.1"
        with pytest.raises(ConfigError, match=f"pid {os.getpid()} on host"), hold(tmp_path, 0):
            pass
    with hold(tmp_path, 0):  # released
        pass


def test_where_flock_fails_the_recorded_pid_holds_the_workdir(tmp_path, monkeypatch, caplog):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(workdir.fcntl, "flock", no_locks)
    refused = pytest.raises(ConfigError, match=f"in use by another trainer \\(pid {os.getpid()}")
    with hold(tmp_path), refused, hold(tmp_path):
        pass
    assert f"flock failed: {os.strerror(errno.ENOLCK)}" in caplog.text
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    host = socket.gethostname()
    not_running = [
        {"pid": int(ended.stdout), "host": host},  # ended
        {"pid": os.getpid(), "host": host, "ticks": -1},  # a pid reused after a restart
        {"pid": os.getpid(), "host": "elsewhere"},  # cannot be seen: not waited for
    ]
    for record in not_running:
        (tmp_path / ".lock").write_text(json.dumps(record))
        with hold(tmp_path):
            pass
