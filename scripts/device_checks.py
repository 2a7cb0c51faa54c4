"""Issue 8's and issue 17's device checks in one prepared run: the first command of a session
lent a GPU or a TPU machine.

    python scripts/device_checks.py --out DIR [--budget-s 420] [--only moe,dense] [--smoke]
                                    [--platform gpu|tpu]

Each check runs in its own subprocess with its own time limit, so one that fails or hangs costs
only itself and the rest of the budget goes to the next; this process never opens the device (a
TPU serves one process at a time). A check that breaks (an import, an API that moved) fails in
seconds, which leaves time to fix it and rerun with --only. The env check runs first: the
backend it finds picks the other checks' arguments (--platform overrides it). In order (their
arguments are in scripts/device_check_list.py):
- env: backend, devices, versions, the memory planner's name for the device, and the attention
  and expert kernels that the recipe, t4_mini and colab_tpu configs resolve to there (auto).
- attention: bench_attention.py, bf16, 14/2 heads of 64: XLA (all scores at once, and blocks of
  512) against the kernel `model.attention=auto` picks: cuDNN flash attention on a GPU (4 x 4,096
  tokens), Pallas splash attention on a TPU (4 x 2,048, colab_tpu's rows). Output and gradient
  differences from XLA's, and times.
- experts: bench_grouped_matmul.py at the recipe's expert shape on one micro-batch of the moe
  run's tokens, bf16: `blocked` and `ragged_dot` (auto's pick on a GPU), on a TPU also megablox
  `gmm` (auto's pick there), against a dense matmul of the same FLOPs; output and gradient
  differences from a float32 reference.
- moe: bench_train.py on the recipe with 8 layers and auto's kernels. GPU: 8 x 4,096 tokens,
  remat none, cuDNN + ragged_dot, --compare-torch (MixtralForCausalLM); the target is MFU >= 30 %
  on one H100. In bf16 torch's experts run eagerly, one expert at a time (its grouped_mm would
  run them in float32 under autocast), so read the ratio against that baseline, not against
  torch's best. TPU: as configs/colab_tpu.py trains (FSDP, full remat, rows of 2,048), 16 rows a
  step, splash + gmm.
- plan: the memory planner's total for the moe run on this device, to hold against that run's
  memory_stats peak.
- gpu_preset (GPU) / tpu_preset (TPU): `python -m hanuman_jax.train` on configs/t4_mini.py or
  configs/colab_tpu.py cut to 2 layers, 6 steps on the bundled sample corpus: the last
  metrics.jsonl row (throughput, and MFU and peak memory where the run logs them). With 2 layers
  the input pipeline (one thread, tokenizing the sample as it goes) may be what sets the pace.
- dense: bench_train.py on configs/bench_dense_05b.py. GPU: --compare-torch (LlamaForCausalLM);
  the target is MFU >= 45 % on one H100. TPU: 8 x 2,048 tokens, full remat.
- moe_blocked: the moe run with the `blocked` expert kernel, without torch.
- moe_xla: the moe run with model.attention=xla (blocks of 512), without torch.

Results:
- DIR/device_checks.jsonl: one object per check, with name, command, rc, seconds and the
  JSON lines the check printed.
- DIR/<name>.log: each check's whole output; DIR/<name>.metrics.jsonl: a preset run's metrics.
- A summary at the end.

`--smoke` runs the checks and configs at tiny shapes, without torch, on any backend. On a CPU it
runs every check of both platforms, splash and gmm in Pallas interpret mode and cuDNN skipped
with its reason; the tests run it there.

On the lent H100 or H200 machine, the image has jax, flax, optax, orbax, sentencepiece, torch and
transformers, but not ml_collections, nor what the presets' data pipeline and metrics need. Carry
them as wheels (Python 3.12 there):
1. Once, here, in the repo root:

       echo /.whl/ >> .git/info/exclude
       python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
           --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
           --platform manylinux2014_x86_64 -d .whl ml-collections==1.1.0 grain==0.2.18 \
           array-record==0.8.6 portpicker==1.6.0 tensorboardX==2.6.5

2. Then one run, with carry [".whl"] and timeout_s 480. $OUT brings back 8 files at most, so
   the logs come back as one archive beside device_checks.jsonl:

       python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
       PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 python3 scripts/device_checks.py --out /tmp/dc;
       cp /tmp/dc/device_checks.jsonl $OUT/; tar czf $OUT/device_checks.tgz -C /tmp dc

On a TPU VM or a Colab TPU runtime, with the package installed (`pip install -e '.[tpu]'`), one
run of at most 8 minutes:

       PYTHONUNBUFFERED=1 python3 scripts/device_checks.py --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from device_check_list import CHECKS, DEVICE_FLAG, WORKDIR, Check

ROOT = Path(__file__).resolve().parents[1]
# a preset run's figures, read from its last metrics.jsonl row where this version logs them
PRESET_FIGURES = ("step", "seq_len", "loss", "tokens_per_s", "mfu", "peak_memory_bytes",
                  "peak_memory_gib", "memory_fraction")  # fmt: skip


def json_lines(text: str) -> list[dict]:
    """The JSON objects a check printed, one per line."""
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                found.append(json.loads(line))
    return found


def fill(argv: list[str], env: dict, workdir: Path) -> list[str]:
    """`argv` with DEVICE_FLAG and WORKDIR filled in (DEVICE_FLAG dropped where the env check
    named no planner device: the planner then plans for the devices it sees)."""
    device = env.get("planner_device")
    filled = []
    for a in argv:
        filled += ([f"--device={device}"] if device else []) if a == DEVICE_FLAG else [a]
    return [str(workdir) if a == WORKDIR else a for a in filled]


def run(name: str, argv: list[str], timeout_s: float, out: Path) -> dict:
    """`python argv` from the repo root: its record, its output in DIR/<name>.log."""
    argv = [sys.executable, *argv]
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        rc, stdout, text = proc.returncode, proc.stdout, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        stdout, stderr = (x.decode(errors="replace") if isinstance(x, bytes) else x or ""
                          for x in (e.stdout, e.stderr))  # fmt: skip
        rc, text = "timeout", stdout + stderr + f"\n[timed out after {timeout_s:.0f} s]"
    seconds = round(time.perf_counter() - start, 1)
    (out / f"{name}.log").write_text(text)
    record = {"name": name, "command": " ".join(argv[1:]), "rc": rc, "seconds": seconds}
    record["results"] = json_lines(stdout)
    if name == "plan":
        m = re.search(r"total per device\s+([\d.]+) (\w+)", text)
        record["results"].append({"planned_total": m and f"{m.group(1)} {m.group(2)}"})
    if rc != 0:
        record["tail"] = text[-1500:]
    return record


def preset_figures(workdir: Path, copy: Path) -> list[dict]:
    """The figures of a run's last training row, its metrics.jsonl copied to `copy`."""
    metrics = workdir / "metrics.jsonl"
    if not metrics.exists():
        return []
    shutil.copyfile(metrics, copy)
    rows = [r for r in json_lines(metrics.read_text()) if "loss" in r]
    return [{k: rows[-1][k] for k in PRESET_FIGURES if k in rows[-1]}] if rows else []


def run_check(check: Check, argv: list[str], env: dict, timeout_s: float, out: Path) -> dict:
    """Runs one check in a fresh temporary workdir (a preset run's checkpoint stays out of DIR)."""
    with tempfile.TemporaryDirectory(prefix=f"{check.name}_") as tmp:
        workdir = Path(tmp) / "run"
        record = run(check.name, fill(argv, env, workdir), timeout_s, out)
        record["results"] += preset_figures(workdir, out / f"{check.name}.metrics.jsonl")
    return record


def skipped(name: str, why: str) -> dict:
    return {"name": name, "rc": "skipped", "seconds": 0, "results": [], "tail": f"skipped: {why}"}


def figures(r: dict) -> str:
    """One result's figures, in a few words."""
    if "tokens_per_s" in r:
        keys = ("tokens_per_s", "mfu_measured_peak", "mfu_nominal_peak", "mfu", "ratio",
                "peak_memory_bytes", "peak_memory_gib", "compile_s", "loss")  # fmt: skip
        return ", ".join(f"{k} {r[k]}" for k in keys if r.get(k) is not None)
    if isinstance(r.get("ms"), dict):  # bench_attention
        return (f"ms {r['ms']}, max_out_diff {r.get('max_out_diff')}, max_grad_diff "
                f"{r.get('max_grad_diff')}, skipped {sorted(r.get('skipped', {}))}")  # fmt: skip
    if "kernel" in r:  # bench_grouped_matmul
        notes = [f"{r['ratio_vs_dense']}x dense"]
        if "max_grad_diff" in r:
            notes.append(f"max diff out {r['max_out_diff']:.1e}, grads {r['max_grad_diff']:.1e}")
        notes += [k for k in ("auto", "interpret") if r.get(k)]
        return f"{r['kernel']} {r['ms']} ms ({', '.join(notes)})"
    return json.dumps(r)


def summary(record: dict) -> str:
    """One line of a check's figures."""
    head = f"{record['name']}: rc {record['rc']}, {record['seconds']} s"
    if record["rc"] != 0:
        return head + "; " + ((record.get("tail") or "").strip().splitlines() or [""])[-1]
    return head + "; " + "; ".join(map(figures, record["results"]))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the logs and device_checks.jsonl")
    p.add_argument("--budget-s", type=float, default=420, help="all checks together")
    p.add_argument("--only", default="", help="comma-separated check names (default: all)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, no torch, any backend")
    p.add_argument("--platform", choices=("gpu", "tpu", "cpu"),
                   help="checks for this platform (default: the env check's backend)")  # fmt: skip
    args = p.parse_args()
    names = [c.name for c in CHECKS]
    args.only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(args.only) - set(names))
    if unknown:
        p.error(f"--only names unknown checks {unknown}; known: {names}")
    return args


def wanted(check: Check, args: argparse.Namespace) -> bool:
    """Whether `check` is asked for; env also where it must find the platform."""
    if not args.only or check.name in args.only:
        return True
    return check.name == "env" and not args.platform


def next_record(check: Check, args: argparse.Namespace, env: dict, left: float) -> dict | None:
    """The record of `check` on the platform found: run, or skipped; None: not a check of it."""
    if left < min(check.timeout_s, 30):
        return skipped(check.name, f"{left:.0f} s of the budget left")
    platform = args.platform or env.get("backend")
    if check.name != "env" and platform is None:
        return skipped(check.name, "no platform: the env check found no backend (--platform)")
    argv = check.smoke if check.name == "env" else check.argv(platform, args.smoke)
    if argv is None:
        return skipped(check.name, f"not a {platform} check") if args.only else None
    return run_check(check, argv, env, min(check.timeout_s, left), Path(args.out))


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    start = time.perf_counter()
    records, env = [], {}
    with open(out / "device_checks.jsonl", "w") as f:
        for check in filter(lambda c: wanted(c, args), CHECKS):
            record = next_record(check, args, env, args.budget_s - (time.perf_counter() - start))
            if record is None:
                continue
            if check.name == "env":  # what it printed, failed or not
                env = {k: v for r in record["results"] for k, v in r.items()}
            records.append(record)
            f.write(json.dumps(record) + "\n")
            f.flush()
            print(summary(record), flush=True)
    failed = [r["name"] for r in records if r["rc"] != 0]
    print(json.dumps({"checks": len(records), "failed": failed,
                      "seconds": round(time.perf_counter() - start, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
