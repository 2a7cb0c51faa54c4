"""Time to first step when a run resumes, with the workdir's compilation cache and without it.

    python scripts/bench_resume.py [--config configs/tiny.py] [--repeats 3] [--config.a.b=v ...]

A restarted Colab runtime runs the same command again and resumes from the newest checkpoint.
This script trains the config for 2 steps (a checkpoint after each), then, `--repeats` times and
alternating, removes step 2 and resumes from step 1 with `train.compilation_cache` on and off
(the first resume with it on, untimed, fills the cache). Each resume is a fresh process: its time
to first step runs from the process's start to the log line saying the train step is ready
(imports, restore and the compile, or the cache load, included). Prints one JSON line per
resume and a summary line with the medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(
    r"step \d+: the train step (compiled|loaded from the compilation cache) in ([\d.]+) s"
)


def resume(workdir: Path, config: str, overrides: list[str], cache: bool) -> dict:
    """Resumes the run in `workdir` from step 1 and times it to its first step."""
    shutil.rmtree(workdir / "checkpoints" / "2", ignore_errors=True)
    flags = [*overrides, "--config.train.steps=2", "--config.train.checkpoint_every=1"]
    if not cache:
        flags.append("--config.train.compilation_cache=")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    cmd = [sys.executable, "-m", "hanuman_jax.train", "--config", config, "--workdir",
           str(workdir), "--no-progress", *flags]  # fmt: skip
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    ready, lines = None, []
    for line in proc.stderr:
        lines.append(line)
        found = READY.search(line)
        if found and ready is None:
            ready = {"first_step_s": round(time.perf_counter() - began, 2),
                     "how": found[1], "step_ready_s": float(found[2])}  # fmt: skip
    if proc.wait() != 0 or ready is None:
        tail = "".join(lines[-15:])
        raise SystemExit(f"the resume failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return {"cache": cache, **ready}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--repeats", type=int, default=3)
    args, overrides = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "run"
        resume(workdir, args.config, overrides, cache=True)  # trains steps 1-2, fills the cache
        resume(workdir, args.config, overrides, cache=True)  # the resumed step's program, cached
        rows = {True: [], False: []}
        for _ in range(args.repeats):
            for cache in (False, True):
                rows[cache].append(resume(workdir, args.config, overrides, cache))
                print(json.dumps(rows[cache][-1]), flush=True)

    def median(cache: bool, key: str) -> float:
        return statistics.median(row[key] for row in rows[cache])

    on, off = median(True, "first_step_s"), median(False, "first_step_s")
    print(json.dumps({"config": args.config, "overrides": overrides, "repeats": args.repeats,
                      "first_step_s_cache": on, "first_step_s_no_cache": off,
                      "ratio_no_cache_over_cache": round(off / on, 2),
                      "step_ready_s_cache": median(True, "step_ready_s"),
                      "step_ready_s_no_cache": median(False, "step_ready_s")}))  # fmt: skip


if __name__ == "__main__":
    main()
