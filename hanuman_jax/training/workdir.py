"""A training run's workdir: created writable, held by one trainer at a time, and its logs read
back whatever a killed run left at their end.

Two trainers on one workdir append every metrics row twice and race each other's checkpoints, so
`train()` holds the workdir from before it reads or writes anything there until it ends. The hold
is an OS advisory lock, `fcntl.flock` on `WORKDIR/.lock`, and a second trainer is refused in one
line naming the holder's pid, host and start time, which the file records. A lock is never left
stale: the kernel drops it when the holder ends in any way, SIGKILL and the OOM killer included.
The file is emptied on release but never deleted (deleting it would let one trainer lock the old
file and the next one a new file: both would run).

Where flock cannot lock, it raises OSError (ENOLCK on an NFS mount without its lock daemon) or is
absent (Windows). Then a warning is logged and the pid recorded in the file decides instead: a
trainer that still runs on this host (the same pid, started at the same clock tick on Linux, so
that a reused pid does not count) holds the workdir; one on another host cannot be seen, and is
not waited for. FUSE filesystems that do not lock themselves, such as Google Drive mounted on
Colab, get the kernel's local flock: it holds between the processes of one machine, all that a
Colab session has. An NFS mount with `nolock` locks locally too.

Each process of a multi-process run holds a lock of its own, `.lock` for process 0 and `.lock.<i>`
for process i: the run's processes may share one workdir (NFS, gcsfuse) or each have one on its
host, and either way they never block each other, while a second run's process i meets the first
run's process i on the same file (a shared workdir) or on the same host (local ones). A shared
workdir whose locks hold only per host (gcsfuse) guards only the processes on each host.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from hanuman_jax.config import ConfigError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger("hanuman_jax")

LOCK = ".lock"


def lock_path(workdir: Path, process_index: int = 0) -> Path:
    """The lock file of process `process_index` (why each process has its own: above)."""
    return workdir / (LOCK if process_index == 0 else f"{LOCK}.{process_index}")


@contextlib.contextmanager
def hold(workdir: Path, process_index: int = 0) -> Iterator[Path]:
    """Creates `workdir` and holds it for this process until the block ends; ConfigError now,
    not at the first save hours later, if it cannot be written or another trainer holds it."""
    path = lock_path(workdir, process_index)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _not_writable(workdir, e) from None
    try:
        _lock(fd, path, workdir)
    except BaseException:
        os.close(fd)
        raise
    try:
        _check_writable(workdir)  # the lock file may be an old one in a read-only directory
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(_this_process()).encode() + b"\n")
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # drops the lock


def _check_writable(workdir: Path) -> None:
    try:
        probe = workdir / f".write_test.{os.getpid()}"  # one per process: they share the folder
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise _not_writable(workdir, e) from None


def _not_writable(workdir: Path, e: OSError) -> ConfigError:
    return ConfigError(f"--workdir {workdir} is not writable: {e.strerror}")


def _lock(fd: int, path: Path, workdir: Path) -> None:
    """flock; where the filesystem cannot, the recorded pid's check, with a warning."""
    if fcntl is None:
        reason = "this system has no flock"
    else:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            raise ConfigError(_in_use(workdir, _holder(fd))) from None
        except OSError as e:
            reason = f"flock failed: {e.strerror}"
    log.warning("%s cannot be locked (%s): only a trainer recorded in it as running on this host "
                "keeps another out", path, reason)  # fmt: skip
    holder = _holder(fd)
    if holder and _running(holder):
        raise ConfigError(_in_use(workdir, holder))


def _in_use(workdir: Path, holder: dict | None) -> str:
    who = "a process that has not yet recorded its pid"
    if holder:
        who = f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started')}"
    return (f"--workdir {workdir} is in use by another trainer ({who}); wait for it to end or "
            "stop it, or pass another --workdir")  # fmt: skip


def _this_process() -> dict:
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "started": now, "ticks": _start_ticks(pid)}


def _holder(fd: int) -> dict | None:
    """What the lock file records of its holder; None when empty or unreadable."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (Linux); None: no such process, or
    no /proc to ask."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22, starttime
    except (OSError, ValueError, IndexError):
        return None


def _running(holder: dict) -> bool:
    """Whether the trainer `holder` records still runs; one on another host cannot be seen."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    ticks = _start_ticks(pid)
    if ticks is not None:
        return holder.get("ticks") in (None, ticks)
    if os.name != "posix" or Path("/proc/self/stat").exists():
        return False  # no such process (Linux); Windows' os.kill would end the process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def jsonl_rows(data: bytes) -> Iterator[tuple[bytes, dict]]:
    """(line, row) for each line of a run's .jsonl log holding a whole row (a JSON object with an
    integer `step`); a line a killed process left torn (cut JSON, a character cut in the middle
    of its bytes, a zero-filled tail) is skipped."""
    for line in data.split(b"\n"):
        try:
            row = json.loads(line.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError is one
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            yield line, row
