"""Replays issue 20's bad inputs and faults against the command line, and judges each outcome.

    python scripts/fault_sweep.py [--only NAME,NAME,...] [--json-only] [--markdown] [--keep DIR]

Each case (scripts/fault_cases.py: a name, the issue item it replays, what it does) sets up a bad
file, a corrupted checkpoint, a kill or a full disk in its own temporary folder, runs the
`python -m hanuman_jax.*` commands as subprocesses with a timeout, and judges what they did:

- ok: the defined behaviour (the exit code; a refusal as exactly one `error:` line naming the
  file or field; no traceback; the outputs expected, nothing lost);
- weak: it works, but with a traceback or a misleading message;
- fail: a wrong result (exit 0 with a wrong model, NaN, a silently reused position) or a hang;
- not replayable: the fault cannot be made on this machine (said why), counted apart.

The model is configs/tiny.py cut small; the cases that need a trained run copy one shared run
(4 steps, checkpoints at 2 and 4), and every command shares one XLA compilation cache. Prints a
line per case (name, item, verdict, seconds, reason), then one JSON line
{"tried", "ok", "weak", "fail", "not_replayable", "seconds"}; exits 1 if any case is weak or
failed. `--markdown` also prints the table BENCHMARKS.md quotes, before the summary; `--keep DIR`
works in DIR and keeps it, where a case that is not ok leaves its commands' output in
DIR/NAME/commands.log.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fault_cases import CASES
from fault_checks import CONFIG, ROOT, Result

# configs/tiny.py cut small: the shape every case trains, resumes and exports
SMALL = ("--config.model.num_layers=2", "--config.model.d_model=64", "--config.data.seq_len=64",
         "--config.train.batch_size=4")  # fmt: skip
# every run: 4 steps, a checkpoint every 2; the shared run also samples (for samples.jsonl)
RUN = ("--config.train.steps=4", "--config.train.checkpoint_every=2", "--config.train.log_every=1")
SAMPLES = ("--config.train.sample_every=2", "--config.train.sample_tokens=4")
TIMEOUT_S = 300  # per command: a tiny run compiles in ~15 s on 2 busy cores


@dataclasses.dataclass
class Proc:
    """What one command did; `rc` None when it ran past its timeout (and was killed)."""

    cmd: list[str]
    rc: int | None
    out: str
    err: str
    seconds: float

    @property
    def errors(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]

    def tail(self, lines: int = 3) -> str:
        """The last lines of stderr (stdout when stderr is empty), joined with ' | '."""
        text = (self.err.strip() or self.out.strip()).splitlines()
        return " | ".join(line.strip()[:240] for line in text[-lines:])


class Sweep:
    """What the cases run commands with: one temporary root, one environment (CPU unless
    JAX_PLATFORMS says otherwise, one compilation cache) and the shared trained run."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp / "xla"))
        self.env.setdefault("JAX_PLATFORMS", "cpu")
        self._run: Path | None = None
        self.ran: list[Proc] = []  # the commands of the case running now, for its log

    def run(self, cmd: list[str], timeout: float = TIMEOUT_S) -> Proc:
        """Runs `cmd` from the repository root; on a timeout kills its process group."""
        began = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, errors="replace",
                                start_new_session=True)  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            out, err = proc.communicate()
            rc = None
        self.ran.append(Proc(cmd, rc, out, err, time.perf_counter() - began))
        return self.ran[-1]

    def start(self, cmd: list[str], log: Path) -> subprocess.Popen:
        """`cmd` in the background in its own process group, its output in `log`."""
        with open(log, "w") as f:
            return subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def module(self, module: str, *args: str) -> list[str]:
        return [sys.executable, "-m", f"hanuman_jax.{module}", *map(str, args)]

    def cli(self, module: str, *args, timeout: float = TIMEOUT_S) -> Proc:
        """`python -m hanuman_jax.MODULE ARGS`."""
        return self.run(self.module(module, *args), timeout)

    def train_cmd(self, workdir: Path, *overrides: str) -> list[str]:
        """The shared run's training command on `workdir`; `overrides` come last and win."""
        return self.module("train", "--config", CONFIG, "--workdir", workdir, "--no-progress",
                           *SMALL, *RUN, *overrides)  # fmt: skip

    def train(self, workdir: Path, *overrides: str, timeout: float = TIMEOUT_S) -> Proc:
        return self.run(self.train_cmd(workdir, *overrides), timeout)

    def copy_run(self, dest: Path) -> Path:
        """A copy of the shared run (trained the first time a case asks for it) at `dest`."""
        if self._run is None:
            run = self.tmp / "shared_run"
            proc = self.train(run, *SAMPLES)
            if proc.rc != 0:
                raise RuntimeError(f"the shared run did not train (exit {proc.rc}): {proc.tail()}")
            self._run = run
        shutil.copytree(self._run, dest, symlinks=True)
        return dest


@dataclasses.dataclass
class Row:
    name: str
    item: str
    what: str
    verdict: str
    seconds: float
    reason: str

    def line(self) -> str:
        return (f"{self.name:<26} {self.item:<5} {self.verdict:<14} {self.seconds:6.1f} s  "
                f"{self.reason}")  # fmt: skip


def run_case(sweep: Sweep, case) -> Row:
    """One case in its own folder; an exception of the harness itself is a `fail` of that case
    (with its message), so that one broken setup never hides the others. A case not ok leaves
    the output of its commands in its folder's commands.log."""
    where = sweep.tmp / case.name
    where.mkdir()
    began, sweep.ran = time.perf_counter(), []
    try:
        result = case.run(sweep, where)
    except Exception as e:  # noqa: BLE001 (reported as the case's reason)
        result = Result("fail", f"the case itself raised {type(e).__name__}: {e}")
    took = time.perf_counter() - began
    if result.verdict != "ok":  # kept with --keep: what each command printed
        (where / "commands.log").write_text("".join(
            f"$ {' '.join(map(str, p.cmd))}\n# exit {p.rc}, {p.seconds:.1f} s\n{p.out}{p.err}\n"
            for p in sweep.ran
        ))  # fmt: skip
    return Row(case.name, case.item, case.what, result.verdict, round(took, 1), result.reason)


def summary(rows: list[Row], seconds: float) -> dict:
    count = {v: sum(r.verdict == v for r in rows) for v in ("ok", "weak", "fail", "not replayable")}
    return {"tried": count["ok"] + count["weak"] + count["fail"], "ok": count["ok"],
            "weak": count["weak"], "fail": count["fail"],
            "not_replayable": count["not replayable"], "seconds": round(seconds)}  # fmt: skip


def markdown(rows: list[Row]) -> str:
    head = "| case | item | what it does | verdict | s |\n|---|---|---|---|---|\n"
    return head + "\n".join(f"| `{r.name}` | {r.item} | {r.what} | {r.verdict} | {r.seconds:.0f} |"
                            for r in rows)  # fmt: skip


def select(only: str | None) -> list:
    if not only:
        return list(CASES)
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {c.name: c for c in CASES}
    if unknown := [n for n in names if n not in known]:
        raise SystemExit(f"error: --only: no case {', '.join(unknown)} (cases: {', '.join(known)})")
    return [known[n] for n in names]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated case names (default: all)")
    parser.add_argument("--json-only", action="store_true", help="print only the summary line")
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (debugging)")
    args = parser.parse_args()
    cases = select(args.only)
    began, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="fault_sweep_") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        sweep = Sweep(root)
        for case in cases:
            rows.append(run_case(sweep, case))
            if not args.json_only:
                print(rows[-1].line(), flush=True)
    if args.markdown:
        print(markdown(rows))
    result = summary(rows, time.perf_counter() - began)
    print(json.dumps(result), flush=True)
    return 1 if result["weak"] or result["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
