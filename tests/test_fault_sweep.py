"""scripts/fault_sweep.py: its judges tell ok from weak from fail, and a few fast cases run end to
end through the command line (the whole sweep is run by hand: BENCHMARKS.md)."""

import json
import math
import subprocess
import sys

import pytest


@pytest.fixture
def sweep_modules(root, monkeypatch):
    monkeypatch.syspath_prepend(str(root / "scripts"))
    import fault_checks
    import fault_sweep

    return fault_checks, fault_sweep


def _proc(module, rc, err="", out=""):
    """What fault_sweep.Sweep.run returns for a command that ended with `rc` (None: hung)."""
    return module.Proc(["cmd"], rc, out, err, 1.0)


def test_refused_wants_exit_2_and_one_error_line_naming_the_file(sweep_modules):
    checks, sweep = sweep_modules
    line = "error: data/x.jsonl:4: nested too deeply to read"
    crash = f"{checks.TRACEBACK}\n  ...\nRecursionError: maximum recursion depth exceeded"
    assert checks.refused(_proc(sweep, 2, line), "x.jsonl:4") == ("ok", line)
    judged = {
        "hung": checks.refused(_proc(sweep, None), "x"),
        "exit 0": checks.refused(_proc(sweep, 0, "all fine"), "x"),
        "traceback": checks.refused(_proc(sweep, 1, crash), "x"),
        "two lines": checks.refused(_proc(sweep, 2, f"{line}\n{line}"), "x.jsonl:4"),
        "exit 1": checks.refused(_proc(sweep, 1, line), "x.jsonl:4"),
        "misleading": checks.refused(_proc(sweep, 2, line), "y.jsonl"),
    }  # fmt: skip
    assert {k: v.verdict for k, v in judged.items()} == {
        "hung": "fail", "exit 0": "fail", "traceback": "weak", "two lines": "weak",
        "exit 1": "weak", "misleading": "weak",
    }  # fmt: skip
    assert "y.jsonl" in judged["misleading"].reason


def test_succeeded_wants_exit_0_no_traceback_and_the_message(sweep_modules):
    checks, sweep = sweep_modules
    warned = "WARNING checkpoint 4 is damaged"
    assert checks.succeeded(_proc(sweep, 0, warned), "damaged").ok
    assert checks.succeeded(_proc(sweep, 2, "error: no"), "damaged").verdict == "fail"
    assert checks.succeeded(_proc(sweep, None)).verdict == "fail"
    assert checks.succeeded(_proc(sweep, 0, f"{checks.TRACEBACK}\n{warned}")).verdict == "weak"
    assert checks.succeeded(_proc(sweep, 0, "silent"), "damaged").verdict == "weak"


def test_trained_to_fails_a_nan_or_a_short_run_and_weakens_a_step_logged_twice(
    sweep_modules, tmp_path
):
    checks, _ = sweep_modules

    def judge(losses, torn=b""):
        rows = [json.dumps({"step": s, "loss": x}) for s, x in losses]
        (tmp_path / "metrics.jsonl").write_bytes("\n".join(rows).encode() + b"\n" + torn)
        return checks.trained_to(tmp_path, 3).verdict

    assert judge([(1, 2.0), (2, 1.9), (3, 1.8)], torn=b'{"step": 4, "text": "\xe0\xb8') == "ok"
    assert judge([(1, 2.0), (2, math.nan), (3, 1.8)]) == "fail"
    assert judge([(1, 2.0), (2, 1.9)]) == "fail"
    assert judge([(1, 2.0), (2, 1.9), (2, 1.9), (3, 1.8)]) == "weak"


def test_a_case_whose_setup_raises_is_a_failure_of_that_case(sweep_modules, tmp_path):
    checks, sweep = sweep_modules

    def broken(_sweep, _where):
        raise KeyError("num_layers")

    row = sweep.run_case(sweep.Sweep(tmp_path), checks.Case("broken", "5", "a test", broken))
    assert (row.verdict, row.item) == ("fail", "5")
    assert "KeyError" in row.reason and (tmp_path / "broken" / "commands.log").is_file()


def test_the_sweep_runs_fast_cases_and_prints_a_line_each_and_the_summary(root):
    cases = "config-not-python,absurd-vocab-size,absurd-steps"
    proc = subprocess.run([sys.executable, "scripts/fault_sweep.py", "--only", cases], cwd=root,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert [line.split()[:3] for line in lines[:-1]] == [
        ["config-not-python", "weak", "ok"], ["absurd-vocab-size", "7", "ok"],
        ["absurd-steps", "7", "ok"],
    ]  # fmt: skip
    summary = json.loads(lines[-1])
    assert {k: summary[k] for k in ("tried", "ok", "weak", "fail", "not_replayable")} == {
        "tried": 3, "ok": 3, "weak": 0, "fail": 0, "not_replayable": 0,
    }  # fmt: skip
    quiet = subprocess.run([sys.executable, "scripts/fault_sweep.py", "--only", "absurd-steps",
                            "--json-only"], cwd=root, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert json.loads(quiet.stdout)["ok"] == 1 and len(quiet.stdout.splitlines()) == 1
    refused = subprocess.run([sys.executable, "scripts/fault_sweep.py", "--only", "nope"],
                             cwd=root, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode != 0 and "no case nope" in refused.stderr
