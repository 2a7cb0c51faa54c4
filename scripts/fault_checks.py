"""What scripts/fault_cases.py builds its cases from: the verdicts, the judges that turn a
command's outcome into one, and the setups that make a fault (a nested row, a flipped block, an
edited metadata file, a kill, a tmpfs in a namespace).

A case is `run(sweep, where) -> Result`: `sweep` runs the commands (fault_sweep.Sweep: `cli`,
`train`, `train_cmd`, `start`, `run`, `copy_run`), `where` is the case's own empty folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import runpy
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny.py")
SAMPLE = ROOT / "hanuman_jax" / "assets" / "sample"
TRACEBACK = "Traceback (most recent call last)"
QUICK_S = 30  # an absurd size is refused at start: imports and the config, no more
NO_NAMESPACE = 97  # the exit code of the namespace script when it cannot mount its tmpfs


class Result(NamedTuple):
    verdict: str  # ok, weak, fail, or not replayable
    reason: str

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"


def ok(reason: str = "") -> Result:
    return Result("ok", reason)


def weak(reason: str) -> Result:
    return Result("weak", reason)


def fail(reason: str) -> Result:
    return Result("fail", reason)


def not_replayable(reason: str) -> Result:
    return Result("not replayable", reason)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    item: str  # the item: 1-7, or "weak" for its list of weak cases
    what: str
    run: Callable


# --- judges -----------------------------------------------------------------------------------


def refused(proc, *needles: str) -> Result:
    """ok: exit 2 with exactly one `error:` line holding each of `needles`, and no traceback."""
    if proc.rc is None:
        return fail(f"hung: killed after {proc.seconds:.0f} s")
    if proc.rc == 0:
        return fail(f"exit 0 where a refusal was due: {proc.tail()}")
    if TRACEBACK in proc.err:
        return weak(f"a traceback (exit {proc.rc}): {proc.tail()}")
    errors = proc.errors
    if len(errors) != 1 or proc.rc != 2:
        return weak(f"exit {proc.rc} with {len(errors)} error: lines: {proc.tail()}")
    if missing := [n for n in needles if n not in errors[0]]:
        return weak(f"the error does not name {missing}: {errors[0][:300]}")
    return ok(errors[0][:300])


def succeeded(proc, *needles: str) -> Result:
    """ok: exit 0, no traceback, and each of `needles` somewhere in the output."""
    if proc.rc is None:
        return fail(f"hung: killed after {proc.seconds:.0f} s")
    if proc.rc != 0:
        return fail(f"exit {proc.rc}: {proc.tail()}")
    if TRACEBACK in proc.err:
        return weak(f"a traceback, exit 0: {proc.tail()}")
    if missing := [n for n in needles if n not in proc.err + proc.out]:
        return weak(f"the log does not say {missing}")
    return ok()


def metric_rows(workdir: Path) -> list[dict]:
    """metrics.jsonl's training rows in file order; a line that does not parse is left out."""
    rows = []
    for line in (workdir / "metrics.jsonl").read_bytes().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "loss" in row:
            rows.append(row)
    return rows


def trained_to(workdir: Path, last: int) -> Result:
    """ok: metrics.jsonl logs finite losses up to step `last`, each step once."""
    rows = metric_rows(workdir)
    steps = [r["step"] for r in rows]
    if bad := [r["step"] for r in rows if not math.isfinite(r["loss"])]:
        return fail(f"non-finite losses at steps {bad}")
    if not steps or steps[-1] != last:
        return fail(f"metrics.jsonl ends at step {steps[-1:]}, not {last}")
    if len(set(steps)) != len(steps):
        return weak(f"steps logged more than once: {steps}")
    return ok(f"trained to step {last}, losses finite")


def undamaged(result, proc):
    """`result`, unless the output calls a checkpoint damaged (they are whole)."""
    return weak(f"calls a whole checkpoint damaged: {proc.tail()}") if "damaged" in proc.err \
        else result  # fmt: skip


# --- setups -----------------------------------------------------------------------------------


def sources(*paths) -> str:
    """--config.data.sources with each path at the same weight."""
    return "--config.data.sources=" + repr([{"path": str(p), "weight": 1.0} for p in paths])


def prepare(sweep, out: Path, *paths, workers: int = 1, strict: bool = False) -> list[str]:
    """The `data prepare` command of `paths` into `out`."""
    return sweep.module("data", "prepare", "--config", CONFIG, "--output", out, "--workers",
                        workers, sources(*paths), f"--config.data.strict={strict}")  # fmt: skip


def shards(out: Path) -> str:
    """--config.data.sources of the shards `prepare` wrote into `out`."""
    return sources(out / "sources_0" / "*.array_record")


def text_lines(path: Path, count: int, word: str = "alpha") -> Path:
    path.write_text("".join(f"Document {i}: {word} text, the quick brown fox number {i}.\n"
                            for i in range(count)), encoding="utf-8")  # fmt: skip
    return path


def nested_jsonl(path: Path, at: int = 4) -> str:
    """Twelve good rows and, on line `at`, one nested 10,000 deep; returns `path:at`."""
    rows = [json.dumps({"text": f"Row {i}: the quick brown fox jumps over the lazy dog."})
            for i in range(12)]  # fmt: skip
    rows.insert(at - 1, '{"text": "x", "meta": ' + "[" * 10_000 + "]" * 10_000 + "}")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return f"{path}:{at}"


TORN = '{"step": 4, "text": "กรุงเทพ'.encode()[:-1]  # ends inside a Thai character


def resumable(sweep, where: Path) -> Path:
    """A copy of the shared run without its step 4: a resume retrains steps 3-4 from step 2."""
    run = sweep.copy_run(where / "run")
    shutil.rmtree(run / "checkpoints" / "4")
    return run


def largest_data_file(step_dir: Path) -> Path:
    """The largest OCDBT data file of the step's train state."""
    return max((p for p in (step_dir / "state").rglob("*") if p.parent.name == "d"),
               key=lambda p: p.stat().st_size)  # fmt: skip


def flip(step_dir: Path) -> None:
    """Flips 4 KB (or half the file) in the middle of the largest OCDBT data file: its size
    stays the same. tests/test_checkpoint.py uses it too."""
    data = largest_data_file(step_dir)
    size = data.stat().st_size
    count = min(4096, size // 2)
    with open(data, "r+b") as f:
        f.seek((size - count) // 2)
        flipped = bytes(b ^ 0xFF for b in f.read(count))
        f.seek((size - count) // 2)
        f.write(flipped)


def edit_layers(step_dir: Path, reseal: bool) -> None:
    """num_layers 2 -> 1 in meta/metadata (the same size); `reseal`: and its hash in the
    manifest, as someone who meant the edit would (else the hash tells the edit)."""
    meta = step_dir / "meta" / "metadata"
    text = meta.read_text()
    if '"num_layers": 2' not in text:
        raise RuntimeError(f"{meta} holds no num_layers 2 to edit")
    meta.write_text(text.replace('"num_layers": 2', '"num_layers": 1'))
    if reseal:
        manifest = json.loads((step_dir / "manifest.json").read_text())
        record = manifest["files"]["meta/metadata"]
        if isinstance(record, dict):  # else a size alone, as steps sealed before hashes have
            record["sha256"] = hashlib.sha256(meta.read_bytes()).hexdigest()
        (step_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))


def wait_for(condition: Callable[[], bool], proc, timeout: float, every: float = 0.05) -> bool:
    """True once `condition()` holds; False if `proc` ended first (or after `timeout` s)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            return condition()
        time.sleep(every)
    return True


def live_trainer(sweep, where: Path):
    """A trainer on where/run (long: it never saves), once it holds the workdir's lock or, where
    nothing locks, trains; None if it ended first."""
    run = where / "run"
    long = ("--config.train.steps=100000", "--config.train.checkpoint_every=100000")
    proc = sweep.start(sweep.train_cmd(run, *long), where / "first.log")

    def live() -> bool:
        try:
            return json.loads((run / ".lock").read_text())["pid"] == proc.pid
        except (OSError, ValueError, KeyError, TypeError):
            return (run / "metrics.jsonl").exists()

    if wait_for(live, proc, 300):
        return proc
    kill(proc)
    return None


def log_tail(log: Path, lines: int = 3) -> str:
    return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])


def kill(proc) -> None:
    """SIGKILL to the process group `proc` leads (its pool workers too), and reaps it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def in_namespace(sweep, script: str, *args):
    """`script` (sh, given `args` as $1...) as root of a user and mount namespace, where it may
    mount a tmpfs, as any user can where the kernel allows user namespaces; the Proc, or a
    `not replayable` Result where no namespace or tmpfs can be had."""
    if shutil.which("unshare") is None:
        return not_replayable("no unshare command here (util-linux) to mount a tmpfs")
    proc = sweep.run(["unshare", "-rm", "sh", "-c", script, "sh", *map(str, args)])
    if proc.rc == NO_NAMESPACE or (proc.rc and proc.err.startswith("unshare:")):
        return not_replayable(f"no tmpfs in a user namespace here: {proc.tail()}")
    return proc


# $1: a folder to mount a tmpfs of $2 KiB on, $3: a run to copy there, $4: where to copy it back
# after the command ($5...) ran on it
FULL_DISK = f"""mount -t tmpfs -o size="$2"k tmpfs "$1" || exit {NO_NAMESPACE}
cp -a "$3" "$1/run" || exit {NO_NAMESPACE}
d=$1; back=$4; shift 4; "$@"; rc=$?; cp -a "$d/run" "$back"; exit $rc
"""
# $1: a folder to mount a read-only tmpfs on, then the command ($2...)
READ_ONLY = f"""mount -t tmpfs -o ro tmpfs "$1" || exit {NO_NAMESPACE}
shift; exec "$@"
"""


def tiny_sources() -> list[dict]:
    """configs/tiny.py's data.sources (read with ml_collections alone, no jax)."""
    return [dict(s) for s in runpy.run_path(CONFIG)["get_config"]().data.sources]


def exported(out: Path, like: Path | None = None) -> Result:
    """ok: `out` is a whole export (config, weights, tokenizer) of the 2-layer model, its weights
    finite and, with `like` (another export), the same as those."""
    import numpy as np
    from safetensors.numpy import load_file

    missing = [n for n in ("config.json", "model.safetensors", "tokenizer.json")
               if not (out / n).is_file()]  # fmt: skip
    if missing:
        return fail(f"the export lacks {missing}")
    weights = load_file(str(out / "model.safetensors"))
    if bad := [k for k, v in weights.items() if not np.isfinite(v).all()]:
        return fail(f"non-finite weights in {bad[:3]}")
    layers = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    if layers != 2:
        return fail(f"exported {layers} layers, not 2")
    if like is not None:
        theirs = load_file(str(like / "model.safetensors"))
        if theirs.keys() != weights.keys() or any(
            not np.array_equal(theirs[k], weights[k]) for k in theirs
        ):
            return fail(f"the exported weights are not those of {like.name}")
    return ok(f"exported 2 layers{f', the weights of {like.name}' if like else ''}")


def fell_back(proc, out: Path, like: Path) -> Result:
    """ok: an export past a damaged newest step is the export `like` of the step before it, and
    the log says what was damaged."""
    if not (result := succeeded(proc)).ok or not (result := exported(out, like)).ok:
        return result
    return (
        result if "damaged" in proc.err else weak(f"{result.reason}, not saying what was damaged")
    )
