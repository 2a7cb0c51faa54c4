"""Issue 8's GPU checks in one prepared run: the first command of a session lent a GPU machine.

    python scripts/device_checks.py --out DIR [--budget-s 420] [--only moe,dense] [--smoke]

Each check runs in its own subprocess with its own time limit, so one that fails or hangs costs
only itself and the rest of the budget goes to the next. A check that breaks (an import, an API
that moved) fails in seconds, which leaves time to fix it and rerun with --only. In order:
- env: backend, devices and versions.
- attention: bench_attention.py, bf16, 4 x 4,096 tokens, 14/2 heads of 64. It compares XLA (all
  scores at once, and blocks of 512) with cuDNN flash attention, which `model.attention=auto`
  picks there: gradients against XLA's, and times. First, since the moe run needs cuDNN.
- moe: bench_train.py on the recipe shape with 8 layers, 8 x 4,096 tokens, remat none,
  --compare-torch (MixtralForCausalLM). The target is MFU >= 30 % on one H100. In bf16 torch's
  experts run eagerly, one expert at a time (its grouped_mm would run them in float32 under
  autocast), so read the ratio against that baseline, not against torch's best.
- dense: bench_train.py on configs/bench_dense_05b.py, --compare-torch (LlamaForCausalLM).
  The target is MFU >= 45 % on one H100.
- experts: bench_grouped_matmul.py at the recipe's expert shape, bf16. Compares the `blocked`
  and `ragged_dot` kernels against a dense matmul of the same FLOPs.
- plan: the memory planner's total for the moe run, to hold against that run's
  memory_stats peak.
- moe_xla: the moe run again with model.attention=xla (blocks of 512), without torch.

Results:
- DIR/device_checks.jsonl: one object per check, with name, command, rc, seconds and the
  JSON lines the check printed.
- DIR/<name>.log: each check's whole output.
- A summary at the end.

`--smoke` runs the same checks and configs at tiny shapes, without torch, on any backend. The
tests run it on the CPU.

On the lent H200 machine, the image has jax, flax, optax, torch and transformers, but not
ml_collections. Carry it as a wheel:
1. Once, here, in the repo root:

       echo /.whl/ >> .git/info/exclude
       python3 -m pip download --no-deps -d .whl ml-collections==1.1.0

2. Then one run, with carry [".whl"] and timeout_s 480:

       python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
       PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 python3 scripts/device_checks.py --out $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MOE = ["--config", "configs/hanuman_1b_moe.py", "--config.model.num_layers=8",
       "--config.data.seq_len=4096", "--config.data.seq_len_schedule=[]",
       "--config.train.batch_size=8", "--config.model.remat=none"]  # fmt: skip
DENSE = ["--config", "configs/bench_dense_05b.py"]
# the same configs at a size any CPU runs in seconds
TINY = ["--config.model.num_layers=1", "--config.model.d_model=64", "--config.model.num_heads=4",
        "--config.model.num_kv_heads=2", "--config.model.ffn_hidden=96",
        "--config.model.vocab_size=512", "--config.data.seq_len=64",
        "--config.data.seq_len_schedule=[]", "--config.train.batch_size=2"]  # fmt: skip
BENCH = ["scripts/bench_train.py", "--steps", "10", "--rounds", "2"]
SMOKE_BENCH = ["scripts/bench_train.py", "--steps", "1", "--rounds", "1"]
ENV = (
    "import json, sys, jax, flax, optax\n"
    "d = jax.devices()[0]\n"
    "print(json.dumps({'backend': jax.default_backend(), 'device_kind': d.device_kind,\n"
    "    'devices': jax.device_count(), 'python': sys.version.split()[0], 'jax': jax.__version__,\n"
    "    'flax': flax.__version__, 'optax': optax.__version__}))\n"
)


class Check(typing.NamedTuple):
    name: str
    full: list[str]  # arguments after `python`
    smoke: list[str]
    timeout_s: int


# fmt: off
CHECKS = (
    Check("env", ["-c", ENV], ["-c", ENV], 60),
    Check("attention",
          ["scripts/bench_attention.py", "--batch", "4", "--seq", "4096", "--heads", "14",
           "--kv-heads", "2", "--head-dim", "64", "--blocks", "512", "--dtype", "bfloat16"],
          ["scripts/bench_attention.py", "--batch", "1", "--seq", "64", "--heads", "4",
           "--kv-heads", "2", "--head-dim", "16", "--blocks", "32", "--rounds", "1"], 90),
    Check("moe", [*BENCH, *MOE, "--compare-torch"], [*SMOKE_BENCH, *MOE, *TINY], 200),
    Check("dense", [*BENCH, *DENSE, "--compare-torch"], [*SMOKE_BENCH, *DENSE, *TINY], 200),
    Check("experts",
          ["scripts/bench_grouped_matmul.py", "--tokens", "32768", "--d-model", "896",
           "--hidden", "2560", "--experts", "8", "--block-size", "1024", "--dtype", "bfloat16"],
          ["scripts/bench_grouped_matmul.py", "--tokens", "256", "--d-model", "32",
           "--hidden", "64", "--experts", "4", "--repeats", "1"], 90),
    Check("plan", ["-m", "hanuman_jax.memory", *MOE, "--device", "h100"],
          ["-m", "hanuman_jax.memory", *MOE, *TINY, "--device", "h100"], 90),
    Check("moe_xla", [*BENCH, *MOE, "--config.model.attention=xla"],
          [*SMOKE_BENCH, *MOE, *TINY, "--config.model.attention=xla"], 150),
)
# fmt: on


def json_lines(text: str) -> list[dict]:
    """The JSON objects a check printed, one per line."""
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                found.append(json.loads(line))
    return found


def run_check(check: Check, smoke: bool, timeout_s: float, out: Path) -> dict:
    argv = [sys.executable, *(check.smoke if smoke else check.full)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        rc, stdout, text = proc.returncode, proc.stdout, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        stdout, stderr = (x.decode(errors="replace") if isinstance(x, bytes) else x or ""
                          for x in (e.stdout, e.stderr))  # fmt: skip
        rc, text = "timeout", stdout + stderr + f"\n[timed out after {timeout_s:.0f} s]"
    seconds = round(time.perf_counter() - start, 1)
    (out / f"{check.name}.log").write_text(text)
    record = {"name": check.name, "command": " ".join(argv[1:]), "rc": rc, "seconds": seconds}
    record["results"] = json_lines(stdout)
    if check.name == "plan":
        m = re.search(r"total per device\s+([\d.]+) (\w+)", text)
        record["results"].append({"planned_total": m and f"{m.group(1)} {m.group(2)}"})
    if rc != 0:
        record["tail"] = text[-1500:]
    return record


def summary(record: dict) -> str:
    """One line of a check's figures."""
    head = f"{record['name']}: rc {record['rc']}, {record['seconds']} s"
    if record["rc"] != 0:
        return head + "; " + ((record.get("tail") or "").strip().splitlines() or [""])[-1]
    figures = []
    for r in record["results"]:
        if "tokens_per_s" in r:
            keys = ("tokens_per_s", "mfu_measured_peak", "mfu_nominal_peak", "ratio",
                    "peak_memory_bytes", "compile_s")  # fmt: skip
            figures.append(", ".join(f"{k} {r[k]}" for k in keys if r.get(k) is not None))
        elif "ms" in r and isinstance(r["ms"], dict):
            figures.append(f"ms {r['ms']}, max_grad_diff {r.get('max_grad_diff')}")
        elif "kernel" in r:
            diff = f", max grad diff {r['max_grad_diff']}" if "max_grad_diff" in r else ""
            figures.append(f"{r['kernel']} {r['ms']} ms ({r['ratio_vs_dense']}x dense{diff})")
        else:
            figures.append(json.dumps(r))
    return head + "; " + "; ".join(figures)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the logs and device_checks.jsonl")
    p.add_argument("--budget-s", type=float, default=420, help="all checks together")
    p.add_argument("--only", default="", help="comma-separated check names (default: all)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, no torch, any backend")
    args = p.parse_args()
    names = [c.name for c in CHECKS]
    only = [n for n in args.only.split(",") if n] or names
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise SystemExit(f"error: --only names unknown checks {unknown}; known: {names}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    start = time.perf_counter()
    records = []
    with open(out / "device_checks.jsonl", "w") as f:
        for check in CHECKS:
            if check.name not in only:
                continue
            left = args.budget_s - (time.perf_counter() - start)
            if left < min(check.timeout_s, 30):
                record = {"name": check.name, "rc": "skipped", "seconds": 0, "results": [],
                          "tail": f"skipped: {left:.0f} s of the budget left"}  # fmt: skip
            else:
                record = run_check(check, args.smoke, min(check.timeout_s, left), out)
            records.append(record)
            f.write(json.dumps(record) + "\n")
            f.flush()
            print(summary(record), flush=True)
    failed = [r["name"] for r in records if r["rc"] != 0]
    print(json.dumps({"checks": len(records), "failed": failed,
                      "seconds": round(time.perf_counter() - start, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
