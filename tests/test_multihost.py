"""Two processes on 127.0.0.1 (jax.distributed, gloo CPU collectives, 4 devices each) read their
own lanes, assemble the global batch and train exactly like one process with 8 devices."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multihost_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def test_two_processes_match_one(tmp_path):
    port = _free_port()
    out = tmp_path / "multi.json"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out), "2", str(i), str(port)],
            cwd=ROOT,
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    single = tmp_path / "single.json"
    run = subprocess.run([sys.executable, str(WORKER), str(single), "1", "0", "0"], cwd=ROOT,
                         env=_env(8), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    multi, one = json.loads(out.read_text()), json.loads(single.read_text())
    assert multi["devices"] == one["devices"] == 8 and multi["local_devices"] == 4
    np.testing.assert_array_equal(np.array(multi["tokens"]), np.array(one["tokens"]))
    np.testing.assert_allclose(multi["losses"], one["losses"], rtol=1e-5)
