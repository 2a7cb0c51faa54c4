"""The training loop: data, sharded state, checkpoints and logging around the jitted step."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from hanuman_jax import sharding
from hanuman_jax.checkpoint import (
    Checkpointer,
    abstract_with_shardings,
    check_resumable,
    load_params,
    run_meta,
)
from hanuman_jax.config import ConfigError
from hanuman_jax.data import DataError, make_dataset, records, resolve_file
from hanuman_jax.data.pipeline import stats_metrics
from hanuman_jax.metrics import MetricsWriter, ProgressBar
from hanuman_jax.model import count_params
from hanuman_jax.preemption import StopRequest
from hanuman_jax.step import build_setup, init_state, jit_eval_step, jit_train_step
from hanuman_jax.tokenizer import Tokenizer

log = logging.getLogger("hanuman_jax")


class NonFiniteError(ConfigError):
    """The loss stayed NaN/inf for `train.max_nonfinite_steps` steps (a ConfigError, so the CLI
    prints it as one line and exits 2)."""


def prepare_workdir(workdir: Path) -> None:
    """Fails now, not at the first save hours later, if the workdir cannot be written."""
    for directory in (workdir, workdir / "checkpoints"):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise ConfigError(
                f"--workdir {workdir}: {directory} is not writable ({e.strerror})"
            ) from None


def check_disk_space(workdir: Path, state_bytes: int, keep: int) -> None:
    """Warns at start when the disk cannot hold the checkpoints this run will keep."""
    free = shutil.disk_usage(workdir).free
    need = (keep + 1) * state_bytes  # the kept ones and the one being written
    if free < need:
        log.warning(
            "%s has %.2f GB free, and train.keep_checkpoints=%d checkpoints of %.2f GB need "
            "%.2f GB: the disk may fill before the run ends",
            workdir, free / 1e9, keep, state_bytes / 1e9, need / 1e9,
        )  # fmt: skip


def load_tokenizer(cfg: ml_collections.ConfigDict) -> Tokenizer:
    """Loads `data.tokenizer`; sets `model.vocab_size` from it when the config says 0."""
    try:
        tokenizer = Tokenizer(resolve_file(cfg.data.tokenizer))
    except (DataError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"config data.tokenizer={cfg.data.tokenizer!r} is invalid: {reason}"
        ) from None
    if cfg.model.vocab_size == 0:
        with cfg.model.unlocked():
            cfg.model.vocab_size = tokenizer.vocab_size
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"config model.vocab_size={cfg.model.vocab_size} is invalid: the tokenizer "
            f"{tokenizer.path.name} has {tokenizer.vocab_size} pieces; use at least that"
        )
    return tokenizer


def train(cfg: ml_collections.ConfigDict, workdir: Path, *, progress: bool = True) -> dict:
    """Trains to `train.steps`, resuming from the newest checkpoint in `workdir`; returns the last
    logged metrics. SIGTERM or SIGINT: finishes the step, saves and returns."""
    prepare_workdir(workdir)
    tokenizer = load_tokenizer(cfg)
    tokenizer_sha = records.file_sha256(tokenizer.path)
    mesh = sharding.make_mesh(cfg.mesh)
    setup = build_setup(cfg, mesh)
    counts = count_params(setup.model_cfg)
    log.info(
        "model: %s parameters, %s active per token; mesh %s",
        f"{counts['total']:,}",
        f"{counts['active']:,}",
        dict(mesh.shape),
    )
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(setup.abstract_state))
    check_disk_space(workdir, state_bytes, cfg.train.keep_checkpoints)
    batches = iter(
        make_dataset(
            cfg,
            tokenizer.path,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    )
    ckpt = Checkpointer(
        workdir / "checkpoints", keep=cfg.train.keep_checkpoints, tokenizer=tokenizer.path
    )
    meta = run_meta(cfg, counts, tokenizer, tokenizer_sha)
    stop = StopRequest()
    try:
        with stop:
            state, start = _start_state(cfg, setup, ckpt, batches, tokenizer_sha)
            if jax.process_index() == 0:
                (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2) + "\n")
            if start >= cfg.train.steps:
                log.info(
                    "%s is already at step %d of %d: nothing to do",
                    workdir, start, cfg.train.steps,
                )  # fmt: skip
                return {}
            evaluator = Evaluator(setup, eval_batches(cfg, tokenizer.path))
            loop = _Loop(cfg, workdir, setup, ckpt, meta, stop)
            last = loop.run(state, batches, start, progress, evaluator)
    finally:
        batches.close()  # stops the prefetch thread before interpreter shutdown
        ckpt.close()
    if ckpt.saves:
        log.info(
            "%d checkpoint saves blocked the loop for %.1f ms each on average (the writing goes "
            "on in the background)", ckpt.saves, 1e3 * ckpt.blocked_s / ckpt.saves,
        )  # fmt: skip
    if loop.stopped_at is not None:
        where = ckpt.directory / str(loop.stopped_at)
        if loop.nonfinite:
            raise NonFiniteError(
                f"{cfg.train.max_nonfinite_steps} steps in a row had a non-finite loss or "
                f"gradient (train.max_nonfinite_steps), the last at step {loop.nonfinite}; they "
                f"were skipped, and step {loop.stopped_at} is saved to {where}. Lower "
                "optimizer.peak_lr, check the data, or use bfloat16 instead of float16"
            )
        log.warning("stopped by %s: saved step %d to %s; rerun the same command to resume",
                    stop.received, loop.stopped_at, where)  # fmt: skip
    return last


def _start_state(cfg, setup, ckpt, batches, tokenizer_sha):
    """(state, step): resumed from the newest whole checkpoint of this run, or new, with the
    parameters of `train.init_from` when it names another run."""
    if ckpt.steps():
        target = abstract_with_shardings(setup.abstract_state, setup.state_shardings)
        start, state = ckpt.restore_newest(
            target, batches, lambda meta, where: check_resumable(cfg, meta, where, tokenizer_sha)
        )
        log.info("resumed from %s at step %d", ckpt.directory / str(start), start)
        if cfg.train.init_from:
            log.info("train.init_from applies to a new run only: this one resumes")
        return state, start
    if cfg.train.init_from:
        target = abstract_with_shardings(
            setup.abstract_state["params"], setup.state_shardings["params"]
        )
        params, where = load_params(cfg, target, tokenizer_sha)
        log.info("initialised the parameters from %s (new optimizer, schedule and data)", where)
        return init_state(setup, params), 0
    return init_state(setup), 0


def _process_sum(stats: dict) -> dict:
    """Sums the data counters over processes (each process counts only its own lanes)."""
    if jax.process_count() == 1:
        return stats
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(
        {k: np.asarray(v) for k, v in stats.items()}, tiled=False
    )
    return {k: np.asarray(v).sum(axis=0) for k, v in gathered.items()}


def eval_batches(cfg: ml_collections.ConfigDict, tokenizer_path: Path) -> list[dict]:
    """The first `train.eval_batches` batches of `data.eval_sources`: the same set every time."""
    if not cfg.data.eval_sources:
        return []
    ds = make_dataset(cfg, tokenizer_path, process_index=jax.process_index(),
                      process_count=jax.process_count(), eval_sources=True, prefetch=0)  # fmt: skip
    it = iter(ds)
    batches = [next(it) for _ in range(cfg.train.eval_batches)]
    for b in batches:
        b.pop("stats")
    return batches


class Evaluator:
    """Mean loss per predicted token over the fixed evaluation batches."""

    def __init__(self, setup, batches: list[dict]):
        self.setup, self.batches = setup, batches
        self.step_fn = jit_eval_step(setup) if batches else None

    def __call__(self, params) -> dict:
        nll, tokens = 0.0, 0
        for batch in self.batches:
            out = jax.device_get(
                self.step_fn(params, sharding.global_batch(batch, self.setup.mesh))
            )
            nll, tokens = nll + float(out["nll_sum"]), tokens + int(out["tokens"])
        loss = nll / max(tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}


class _Loop:
    """The steps, with logging one step late, periodic saves and evaluation, and the two ways to
    stop early: a signal, or too many non-finite steps in a row."""

    def __init__(self, cfg, workdir, setup, ckpt, meta, stop):
        self.cfg, self.workdir, self.setup, self.ckpt = cfg, workdir, setup, ckpt
        self.meta, self.stop = meta, stop
        self.stopped_at: int | None = None  # the step saved when stopping early
        self.nonfinite = 0  # the step where the non-finite streak reached the limit

    def run(self, state, batches, start, progress, evaluator) -> dict:
        cfg, mesh, ckpt = self.cfg, self.setup.mesh, self.ckpt
        step_fn = jit_train_step(self.setup)
        writer = MetricsWriter(self.workdir, resume_step=start,
                               enabled=jax.process_index() == 0)  # fmt: skip
        bar = ProgressBar(cfg.train.steps, start, enabled=progress and jax.process_index() == 0)
        tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        last: dict = {}
        data_stats: dict = {}
        pending = None  # (step, device metrics, data stats): read one step late
        t_mark, step_mark = time.perf_counter(), start

        def report(step: int, metrics, stats) -> None:
            nonlocal t_mark, step_mark, last, data_stats
            bar.update(step)
            data_stats = stats
            # one scalar of the step before the one running: the host does not wait on it
            if int(metrics["nonfinite_in_a_row"]) >= cfg.train.max_nonfinite_steps:
                self.nonfinite = self.nonfinite or step
            is_first = step == start + 1
            if not (is_first or step % cfg.train.log_every == 0 or step == cfg.train.steps
                    or self.nonfinite):  # fmt: skip
                return
            now = time.perf_counter()
            values = jax.device_get(metrics)
            values["tokens_per_s"] = tokens_per_step * (step - step_mark) / (now - t_mark)
            values |= stats_metrics(_process_sum(stats))
            t_mark, step_mark = now, step
            writer.write(step, values)
            bar.update(step, float(values["loss"]), values["tokens_per_s"])
            last = {"step": step, **{k: float(v) for k, v in values.items()}}

        def flush() -> None:
            nonlocal pending
            if pending is not None:
                report(*pending)
                pending = None

        def save(step: int) -> None:
            flush()  # a checkpoint's rows are written before it, never lost after it
            ckpt.save(step, state, batches.get_state(), self.meta)

        def evaluate(step: int) -> None:
            result = evaluator(state["params"])
            writer.write(step, {f"eval_{k}": v for k, v in result.items()}, section="eval")
            log.info("step %d: eval loss %.4f, perplexity %.2f over %d tokens", step,
                     result["loss"], result["perplexity"], result["tokens"])  # fmt: skip
            last.update({f"eval_{k}": float(v) for k, v in result.items()})

        try:
            for step in range(start, cfg.train.steps):
                position = batches.get_state()  # where the data stands before this batch
                try:
                    host_batch = next(batches)
                except DataError:
                    if step > start:  # keep the steps done so far (data.strict stopped the run)
                        flush()
                        ckpt.save(step, state, position, self.meta)
                        log.error("saved step %d to %s before stopping", step, ckpt.directory)
                    raise
                stats = host_batch.pop("stats")
                state, metrics = step_fn(state, sharding.global_batch(host_batch, mesh))
                if pending is not None:
                    report(*pending)
                pending = (step + 1, metrics, stats)
                done = step + 1 == cfg.train.steps
                if done or (step + 1) % cfg.train.checkpoint_every == 0:
                    save(step + 1)
                if evaluator.batches and (done or (step + 1) % cfg.train.eval_every == 0):
                    evaluate(step + 1)
                if self.nonfinite or self.stop.should_stop(step + 1):
                    if not (done or (step + 1) % cfg.train.checkpoint_every == 0):
                        save(step + 1)
                    self.stopped_at = step + 1
                    break
            flush()
        finally:
            writer.close()
            bar.close()
        if last and self.stopped_at is None:
            log.info("finished at step %d: %s", last["step"], json.dumps(last))
        skipped = {k: v for k, v in stats_metrics(data_stats).items() if "skipped" in k and v}
        if skipped:
            log.warning("unusable records skipped (this process): %s", skipped)
        return last
