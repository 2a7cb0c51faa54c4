"""Time to quality against PyTorch: our trainer and transformers' Mixtral trained alike, held-out
bits per byte against wall time.

    python scripts/bench_quality.py [--config configs/bench_s.py] [--steps 1000] [--eval-points 10]
        [--data DIR | --data bundled] [--tokenizer PATH] [--plot PNG] [--workdir DIR]
        [--config.a.b=value ...]

- Data: `../shared/data` when present (each corpus's every `--heldout-every`th document held out
  and the rest trained on, written to the workdir), else (`--data bundled`) the config's own
  sources and eval_sources: for bench_s and tiny the bundled sample, held out its
  heldout/text.txt. The tokenizer is the config's (the bundled one) or `--tokenizer`;
  `model.vocab_size` is its piece count unless overridden.
- Both runs read the very same batches: ours through its own trainer (`python -m
  hanuman_jax.train`), torch from the same deterministic pipeline (data.make_dataset, same config
  and seed), with the same document masking (torch_baseline.packed_inputs); each step's target
  count is compared. Same AdamW (betas, eps, decay on matrices only, clipping) and the same warmup
  and cosine: optax's schedule and torch's LambdaLR are checked equal at every step first.
- Where transformers' Mixtral has no matching knob the models differ: its init is N(0, init_std)
  everywhere (ours scales the output projections by 1/sqrt(2 x layers)), its router has no
  temperature (the export folds ours into the router weights), no z-loss, and its load-balancing
  loss pools all layers' tokens and is top_k x ours at the same balance (ours: the layers' mean,
  1.0 when balanced).
- Both are evaluated at the same steps on the same held-out batches (loop.eval_batches): ours by
  its trainer, torch by torch_baseline.evaluate. At the end our last checkpoint is exported to
  transformers (hf/export.py) and both final models are scored by that one evaluator: the
  figures reported. Our trainer's final figure must equal its export's within 1e-3 bits per byte,
  or the two curves would not be comparable.
- Wall time runs from launching each run's process to each evaluation's result: Python and its
  imports, data, model, our compilation, training and the evaluations so far. The runs go one
  after the other, ours first, torch with as many threads as cores.
- time_to_quality_ratio: the seconds torch takes to first reach its final held-out bits per
  byte, over the seconds ours takes to reach the same (linear between evaluations).

Prints a line per evaluation; the last line is one JSON object. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_train import load

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
# the corpora of ../shared/data: files, and weight in training and in the held-out mix
SHARED = {
    "thai_news": (["thai_news/thaigov_train.jsonl"], 0.5),
    "thai_social": (["thai_social/pos.txt", "thai_social/neg.txt", "thai_social/q.txt"], 0.25),
    "english": (["english/tinyshakespeare.txt"], 0.25),
}
FIRST_STEP = re.compile(r"step 0: rows of")
EVAL = re.compile(r"step (\d+): eval loss .*?([\d.]+) bits per byte")
AGREE_BPB = 1e-3  # our trainer's evaluation vs the transformers evaluation of its export
LAUNCH_ENV = dict(os.environ)  # both runs start from it, not from this process's settings


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/bench_s.py")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps of each run")
    p.add_argument("--eval-points", type=int, default=10, help="evaluations, evenly spaced")
    p.add_argument("--eval-batches", type=int, default=4, help="held-out batches per evaluation")
    p.add_argument("--data", help="a ../shared/data-like folder, or 'bundled': the config's "
                   "data (default: ../shared/data when present)")  # fmt: skip
    p.add_argument("--heldout-every", type=int, default=20, help="every Nth document held out")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the config's)")
    p.add_argument("--plot", help="PNG of held-out bits per byte against wall seconds")
    p.add_argument("--workdir", help="keeps both runs and exports here (default: a temp folder)")
    p.add_argument("--torch-worker", help=argparse.SUPPRESS)  # the torch run's own process
    args, overrides = p.parse_known_args()
    if args.steps < 1 or args.eval_points < 1 or args.heldout_every < 2:
        p.error("--steps and --eval-points must be >= 1, --heldout-every >= 2")
    return args, overrides


def split_corpus(data: Path, out: Path, every: int) -> list[str]:
    """Writes each corpus of `data` (SHARED) as a train and a held-out JSONL file, every
    `every`th document held out; the overrides that train and evaluate on them."""
    from hanuman_jax.data import read_documents

    out.mkdir(parents=True, exist_ok=True)
    sources, held_out = [], []
    for name, (files, weight) in SHARED.items():
        missing = [f for f in files if not (data / f).is_file()]
        if missing:
            raise SystemExit(f"error: --data {data}: no {', '.join(missing)} (see SHARED)")
        texts = [d.text for f in files for d in read_documents(data / f)]
        for split, keep, specs in (("train", 1, sources), ("heldout", 0, held_out)):
            path = out / f"{split}_{name}.jsonl"
            rows = [json.dumps({"text": t}, ensure_ascii=False) for i, t in enumerate(texts)
                    if (i % every != 0) == keep]  # fmt: skip
            path.write_text("\n".join(rows) + "\n", encoding="utf-8")
            specs.append({"path": str(path), "weight": weight})
    return [f"--config.data.sources={sources!r}", f"--config.data.eval_sources={held_out!r}"]


def run_overrides(args, work: Path, user: list[str]) -> tuple[str, list[str]]:
    """(what the corpus is, the overrides both runs get): the corpus and tokenizer first, the
    user's next, the run's length and evaluation points last."""
    data = args.data or (str(SHARED_DATA) if SHARED_DATA.is_dir() else "bundled")
    first = ["--config.model.vocab_size=0"]
    if data != "bundled":
        first += split_corpus(Path(data), work / "corpus", args.heldout_every)
    if args.tokenizer:
        first.append(f"--config.data.tokenizer={args.tokenizer}")
    every = max(args.steps // args.eval_points, 1)
    last = [f"--config.train.steps={args.steps}", f"--config.train.eval_every={every}",
            f"--config.train.eval_batches={args.eval_batches}",
            f"--config.train.checkpoint_every={args.steps}"]  # fmt: skip
    return data, first + user + last


def check_schedules(cfg) -> None:
    """Stops unless torch's LambdaLR (torch_baseline.warmup_cosine) gives our optax schedule's
    learning rate at every step."""
    import jax
    from torch_baseline import warmup_cosine

    from hanuman_jax.training.optim import lr_schedule

    steps = np.arange(cfg.train.steps)
    ours = np.asarray(jax.vmap(lr_schedule(cfg))(steps), np.float64)
    factor = warmup_cosine(cfg)
    theirs = np.array([factor(int(s)) for s in steps]) * cfg.optimizer.peak_lr
    worst = float(np.max(np.abs(ours - theirs))) / cfg.optimizer.peak_lr
    if worst > 1e-6:
        raise SystemExit(f"error: torch's learning rate differs from ours by {worst:.2e} x peak")


def timed_run(name: str, argv: list[str], log_path: Path, env: dict | None = None) -> dict:
    """Runs `argv` with its output into `log_path`; seconds from its launch to its first step
    and to each evaluation's line ({step: seconds}), each evaluation echoed as it comes with the
    host's 1-minute load average (about the run's threads alone on a quiet host)."""
    times = {"first_step": None, "evals": {}, "load": []}
    env = {**LAUNCH_ENV, "PYTHONUNBUFFERED": "1", **(env or {})}
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log, subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as proc:  # fmt: skip
        for line in proc.stdout:
            now = time.perf_counter() - start
            log.write(line)
            if times["first_step"] is None and FIRST_STEP.search(line):
                times["first_step"] = now
            if match := EVAL.search(line):
                times["evals"][int(match[1])] = now
                times["load"].append(os.getloadavg()[0])
                print(f"{name:>5} step {int(match[1]):>6}: {float(match[2]):.4f} bits per byte "
                      f"at {now:8.1f} s (load {times['load'][-1]:.1f})", flush=True)  # fmt: skip
    if proc.returncode:
        raise SystemExit(f"error: the {name} run failed (exit {proc.returncode}); see {log_path}")
    return times


def torch_worker(out: Path, config: str, overrides: list[str]) -> None:
    """The torch run, in its own process as ours is: the same batches, evaluations at the same
    steps; writes run.json (evaluations, target counts) and the final model under `out`."""
    from torch_baseline import TorchTrainer, evaluate, packed_inputs, warmup_cosine

    from hanuman_jax.data import make_dataset
    from hanuman_jax.training.loop import eval_batches, load_tokenizer
    from hanuman_jax.training.step import target_mask

    cfg = load(config, overrides)
    tokenizer = load_tokenizer(cfg).path
    held_out, text_bytes = eval_batches(cfg, tokenizer)
    trainer = TorchTrainer(cfg, lr_factor=warmup_cosine(cfg))
    steps, every = cfg.train.steps, cfg.train.eval_every
    print(f"step 0: rows of {cfg.data.seq_len} tokens, {cfg.train.batch_size} per batch",
          flush=True)  # fmt: skip
    batches, evals, targets = iter(make_dataset(cfg, tokenizer)), [], []
    try:
        for step in range(1, steps + 1):
            batch = next(batches)
            batch.pop("stats")
            targets.append(int(np.sum(target_mask(batch))))
            loss = trainer.step(packed_inputs(batch, trainer.device))
            if step % every == 0 or step == steps:
                r = evaluate(trainer.model, held_out, text_bytes)
                evals.append({"step": step, "train_loss": float(loss), **r})
                print(f"step {step}: eval loss {r['loss']:.4f}, {r['bits_per_byte']:.4f} bits "
                      "per byte", flush=True)  # fmt: skip
    finally:
        batches.close()
    trainer.model.save_pretrained(out / "hf")
    run = {"evals": evals, "targets": targets, "threads": trainer.threads,
           "model": type(trainer.model).__name__}  # fmt: skip
    (out / "run.json").write_text(json.dumps(run))


def reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """Seconds at which a (seconds, bits per byte) curve first reaches `target`, linear between
    its points; None if it never does."""
    before = None
    for seconds, bpb in curve:
        if bpb <= target:
            if before is None:  # already at the first point: its time, an upper bound
                return seconds
            return before[0] + (seconds - before[0]) * (before[1] - target) / (before[1] - bpb)
        before = (seconds, bpb)
    return None


def score_finals(cfg, work: Path) -> dict:
    """Both final models in transformers, scored by torch_baseline.evaluate on the evaluation
    batches: ours through its export."""
    import torch
    import transformers
    from torch_baseline import evaluate

    from hanuman_jax.hf.export import export
    from hanuman_jax.training.loop import eval_batches, load_tokenizer

    held_out, text_bytes = eval_batches(cfg, load_tokenizer(cfg).path)
    export(work / "ours", work / "ours_hf")
    scores = {}
    for name, folder in (("ours", work / "ours_hf"), ("torch", work / "torch" / "hf")):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        scores[name] = evaluate(model, held_out, text_bytes)
    return scores


def plot(path: Path, ours: list, theirs: list, target: float) -> None:
    """Held-out bits per byte against wall seconds, both runs, and torch's final level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    ax.plot(*zip(*ours, strict=True), "o-", label="ours (JAX, hanuman_jax.train)")
    ax.plot(*zip(*theirs, strict=True), "s-", label="PyTorch (transformers Mixtral)")
    ax.axhline(target, color="gray", linestyle=":", label="torch's final")
    ax.set_xlabel("wall seconds from launch")
    ax.set_ylabel("held-out bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def curves(work: Path, ours_times: dict, torch_times: dict) -> tuple[list, list, list[str]]:
    """(step, seconds, bits per byte) of each evaluation of ours (its trainer's metrics.jsonl)
    and torch's (run.json), and the checks that fail: each logged step of ours must have had as
    many targets as torch's step of the same number (the same batches)."""
    from hanuman_jax.plot import read_metrics

    train_rows, eval_rows = read_metrics(work / "ours" / "metrics.jsonl")
    run = json.loads((work / "torch" / "run.json").read_text())
    ours = [(r["step"], ours_times[r["step"]], r["eval_bits_per_byte"]) for r in eval_rows]
    theirs = [(e["step"], torch_times[e["step"]], e["bits_per_byte"]) for e in run["evals"]]
    same = all(int(r["tokens"]) == run["targets"][r["step"] - 1] for r in train_rows)
    failed = [] if same and [s for s, *_ in ours] == [s for s, *_ in theirs] else ["batches"]
    return ours, theirs, failed


def result(args, corpus: str, cfg, work: Path, times: dict, scores: dict) -> dict:
    """The benchmark's figures (the JSON line)."""
    ours, theirs, failed = curves(work, times["ours"]["evals"], times["torch"]["evals"])
    run = json.loads((work / "torch" / "run.json").read_text())
    diff = abs(ours[-1][2] - scores["ours"]["bits_per_byte"])
    if diff > AGREE_BPB:
        failed.append("evaluator")
    target = theirs[-1][2]  # torch's final level: the time-to-quality target
    torch_s = reach([(s, b) for _, s, b in theirs], target)
    ours_s = reach([(s, b) for _, s, b in ours], target)
    note = None if ours_s else "ours never reached torch's final bits per byte"
    if ours_s and ours[0][2] <= target:
        note = "ours was below torch's final level at its first evaluation: an upper bound"
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len
    return {
        "config": args.config,
        "corpus": corpus,
        "cpu_cores": os.cpu_count(),
        "steps": cfg.train.steps,
        "tokens_per_step": cfg.train.batch_size * cfg.data.seq_len,
        "vocab_size": cfg.model.vocab_size,
        "ours_bits_per_byte": scores["ours"]["bits_per_byte"],
        "torch_bits_per_byte": scores["torch"]["bits_per_byte"],
        "ours_trainer_bits_per_byte": ours[-1][2],
        "evaluator_diff_bits_per_byte": diff,
        "ours_wall_s": round(ours[-1][1], 1),
        "torch_wall_s": round(theirs[-1][1], 1),
        "ours_tokens": tokens,
        "torch_tokens": tokens,
        "ours_first_step_s": round(times["ours"]["first_step"], 1),
        "torch_first_step_s": round(times["torch"]["first_step"], 1),
        "torch_model": run["model"],
        "torch_threads": run["threads"],
        # the host's busiest 1-minute load average at an evaluation: other work shares the cores
        "ours_load_max": round(max(times["ours"]["load"]), 2),
        "torch_load_max": round(max(times["torch"]["load"]), 2),
        "torch_time_to_quality_s": round(torch_s, 1),
        "ours_time_to_quality_s": ours_s and round(ours_s, 1),
        "time_to_quality_note": note,
        "ours_curve": [[s, round(t, 1), b] for s, t, b in ours],
        "torch_curve": [[s, round(t, 1), b] for s, t, b in theirs],
        "failed": failed,
        "quality_ratio": round(
            scores["torch"]["bits_per_byte"] / scores["ours"]["bits_per_byte"], 4
        ),
        "time_to_quality_ratio": ours_s and round(torch_s / ours_s, 3),
    }


def bench(args, user: list[str], work: Path) -> dict:
    """Both runs, one after the other, then both final models scored by one evaluator."""
    if (work / "ours").exists():
        raise SystemExit(f"error: --workdir {work} holds a previous run: give a new folder")
    work.mkdir(parents=True, exist_ok=True)
    corpus, overrides = run_overrides(args, work, user)
    cfg = load(args.config, overrides)
    check_schedules(cfg)
    print(f"{args.config} on {corpus}: {cfg.train.steps} steps of {cfg.train.batch_size} x "
          f"{cfg.data.seq_len} tokens, vocab {cfg.model.vocab_size}, evaluations every "
          f"{cfg.train.eval_every} steps; work in {work}", flush=True)  # fmt: skip
    common = ["--config", args.config, *overrides]
    times = {"ours": timed_run("ours", [sys.executable, "-m", "hanuman_jax.train", "--workdir",
                                        str(work / "ours"), "--no-progress", *common],
                               work / "ours.log")}  # fmt: skip
    (work / "torch").mkdir()
    # the torch run's JAX only reads data: on the host, leaving an accelerator's memory to torch
    times["torch"] = timed_run("torch", [sys.executable, __file__, "--torch-worker",
                                         str(work / "torch"), *common], work / "torch.log",
                               {"JAX_PLATFORMS": "cpu"})  # fmt: skip
    r = result(args, corpus, cfg, work, times, score_finals(cfg, work))
    if args.plot:
        level = r["torch_curve"][-1][2]
        plot(Path(args.plot), [c[1:] for c in r["ours_curve"]], [c[1:] for c in r["torch_curve"]],
             level)  # fmt: skip
    return r


def main() -> None:
    args, user = parse_args()
    if args.torch_worker:
        torch_worker(Path(args.torch_worker), args.config, user)
        return
    # on an accelerator, this process's JAX (the schedule check, the export) takes no memory
    # from the runs or from torch scoring the final models
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
        r = bench(args, user, Path(args.workdir or tmp))
    ttq = r["time_to_quality_ratio"]
    print(f"held-out bits per byte: ours {r['ours_bits_per_byte']:.4f} in {r['ours_wall_s']} s, "
          f"torch {r['torch_bits_per_byte']:.4f} in {r['torch_wall_s']} s; quality ratio "
          f"{r['quality_ratio']:.3f}, time-to-quality ratio "
          f"{'n/a' if ttq is None else f'{ttq:.2f}'}"
          + (f" ({r['time_to_quality_note']})" if r["time_to_quality_note"] else ""))  # fmt: skip
    if r["failed"]:
        print(f"checks failed: {', '.join(r['failed'])} (batches: per-step targets differ; "
              f"evaluator: ours' trainer and its export differ by "
              f"{r['evaluator_diff_bits_per_byte']:.2e} bits per byte)", flush=True)  # fmt: skip
    print(json.dumps(r), flush=True)
    if r["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
