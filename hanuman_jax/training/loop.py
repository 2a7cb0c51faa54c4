"""The training loop: data, sharded state, checkpoints and logging around the jitted step."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from hanuman_jax import __version__, sharding
from hanuman_jax.checkpoint.manager import (
    Checkpointer,
    abstract_with_shardings,
    check_resumable,
    file_sha256,
    init_params,
)
from hanuman_jax.config import ConfigError
from hanuman_jax.data import DataError, make_dataset, resolve_file
from hanuman_jax.data.pipeline import stats_metrics
from hanuman_jax.data.schedule import SeqLenSchedule
from hanuman_jax.model.transformer import count_params
from hanuman_jax.tokenizer import Tokenizer
from hanuman_jax.training.metrics import MetricsWriter, ProgressBar
from hanuman_jax.training.preemption import StopRequest
from hanuman_jax.training.step import build_setup, init_state, jit_eval_step, jit_train_step

log = logging.getLogger("hanuman_jax")


def prepare_workdir(workdir: Path) -> None:
    """Fails now, not at the first save hours later, if the workdir cannot be written."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--workdir {workdir} is not writable: {e.strerror}") from None


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
    """Trains to `train.steps`, resuming from the newest whole checkpoint in `workdir` (else
    starting from `train.init_from`'s parameters, or from scratch); returns the last logged
    metrics."""
    prepare_workdir(workdir)
    tokenizer = load_tokenizer(cfg)
    tokenizer_sha = file_sha256(tokenizer.path)
    mesh = sharding.make_mesh(cfg.mesh)
    setup = build_setup(cfg, mesh)
    counts = count_params(setup.model_cfg)
    log.info(
        "model: %s parameters, %s active per token; mesh %s",
        f"{counts['total']:,}",
        f"{counts['active']:,}",
        dict(mesh.shape),
    )
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
    meta = {
        "config": cfg.to_dict(),
        "version": __version__,
        "parameters": counts,
        "tokenizer": {"file": tokenizer.path.name, "vocab_size": tokenizer.vocab_size,
                      "sha256": tokenizer_sha},
    }  # fmt: skip
    try:
        target = abstract_with_shardings(setup.abstract_state, setup.state_shardings)
        resumed = ckpt.restore_newest(
            target, batches, lambda saved, where: check_resumable(cfg, saved, where, tokenizer_sha)
        )
        if resumed:
            start, state = resumed
            log.info("resumed from %s at step %d", ckpt.directory / str(start), start)
            if cfg.train.init_from:
                log.info("train.init_from is not read: the run goes on from its own checkpoint")
        else:
            start, params = 0, None
            if cfg.train.init_from:
                params = init_params(cfg, setup.abstract_state["params"],
                                     setup.state_shardings["params"], tokenizer_sha)  # fmt: skip
            state = init_state(setup, params)
        if jax.process_index() == 0:
            (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2) + "\n")
        if start >= cfg.train.steps:
            log.info(
                "%s is already at step %d of %d: nothing to do", workdir, start, cfg.train.steps
            )
            return {}
        evaluator = Evaluator(setup, eval_batches(cfg, tokenizer.path))
        sampler = Sampler(cfg, setup, tokenizer.path)
        return _loop(cfg, workdir, setup, state, batches, ckpt, meta, start, progress,
                     evaluator, sampler)  # fmt: skip
    finally:
        batches.close()  # stops the prefetch thread before interpreter shutdown
        ckpt.close()


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
    """Mean loss per predicted token over the fixed evaluation batches, computed by the model as
    it runs outside training (dropless MoE, no router noise): the model that is exported."""

    def __init__(self, setup, batches: list[dict]):
        self.setup, self.batches = setup, batches
        self.step_fn = jit_eval_step(_inference_setup(setup)) if batches else None

    def __call__(self, params) -> dict:
        nll, tokens = 0.0, 0
        for batch in self.batches:
            out = jax.device_get(
                self.step_fn(params, sharding.global_batch(batch, self.setup.mesh))
            )
            nll, tokens = nll + float(out["nll_sum"]), tokens + int(out["tokens"])
        loss = nll / max(tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}


def _inference_setup(setup):
    from hanuman_jax.inference.generate import inference_config
    from hanuman_jax.model.transformer import Transformer

    cfg = inference_config(setup.model_cfg)
    graphdef, template = nnx.split(
        nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param
    )
    return dataclasses.replace(setup, model_cfg=cfg, graphdef=graphdef, param_template=template)


class Sampler:
    """Greedy continuations of `train.sample_prompts`, logged every `train.sample_every` steps."""

    def __init__(self, cfg: ml_collections.ConfigDict, setup, tokenizer: Path):
        self.every, self.prompts = cfg.train.sample_every, list(cfg.train.sample_prompts)
        self.tokens, self.chat = cfg.train.sample_tokens, cfg.train.sample_chat
        self.setup, self.tokenizer = setup, tokenizer

    def __call__(self, params) -> list[tuple[str, str]]:
        from hanuman_jax.inference.generate import sample

        texts = sample(params, self.setup.model_cfg, self.tokenizer, self.prompts,
                       max_new_tokens=self.tokens, chat=self.chat)  # fmt: skip
        return list(zip(self.prompts, texts, strict=True))


def _due(every: int, step: int, last: bool) -> bool:
    """Whether a periodic action (every `every` steps and at the end; 0 = never) runs now."""
    return every > 0 and (step % every == 0 or last)


class Profiler:
    """`train.profile_steps` steps traced with jax.profiler into the TensorBoard directory (its
    Profile tab), from the second step of the run (the first one compiles) and no further than
    its end."""

    def __init__(self, directory: Path, start: int, count: int, end: int):
        # step indices (0-based); the log names them as steps are counted everywhere (1-based)
        self.directory, self.first, self.last = directory, start + 1, min(start + count, end - 1)
        self.active = False
        if count and self.first > self.last:
            log.warning("train.profile_steps=%d: no step is left to trace after the run's first "
                        "(which compiles); nothing is profiled", count)  # fmt: skip
        elif count and self.last < start + count:
            log.warning("train.profile_steps=%d: only steps %d-%d are left to trace", count,
                        self.first + 1, self.last + 1)  # fmt: skip

    def before(self, step: int) -> None:
        if self.first <= step <= self.last and not self.active:
            jax.profiler.start_trace(str(self.directory))
            self.active, self.traced = True, step

    def after(self, step: int, state) -> None:
        if self.active:
            self.traced = step
            if step == self.last:
                self.close(state)

    def close(self, state=None) -> None:
        if self.active:
            if state is not None:
                jax.block_until_ready(state)  # the traced steps' device work, whole
            jax.profiler.stop_trace()
            self.active = False
            log.info("profile of steps %d-%d written to %s (TensorBoard: Profile)",
                     self.first + 1, self.traced + 1, self.directory)  # fmt: skip


class NonFiniteError(RuntimeError):
    """`train.max_nonfinite_steps` steps in a row had a non-finite loss or gradient."""


def _loop(cfg, workdir, setup, state, batches, ckpt, meta, start, progress, evaluator, sampler):
    mesh = setup.mesh
    step_fn = jit_train_step(setup)
    writer = MetricsWriter(workdir, resume_step=start, enabled=jax.process_index() == 0)
    bar = ProgressBar(cfg.train.steps, start, enabled=progress and jax.process_index() == 0)
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len  # in every phase of the schedule
    schedule = SeqLenSchedule.from_config(cfg)
    last: dict = {}
    data_stats: dict = {}
    pending = None  # (step, device metrics, data stats): read one step late, the host never waits
    in_a_row = 0  # non-finite steps in a row, as of the last step read
    saved = start
    t_mark, step_mark = time.perf_counter(), start

    def report(step: int, metrics, stats) -> None:
        nonlocal t_mark, step_mark, last, data_stats, in_a_row
        bar.update(step)
        data_stats = stats
        in_a_row = int(jax.device_get(metrics["nonfinite_in_a_row"]))
        is_first = step == start + 1
        if not (is_first or step % cfg.train.log_every == 0 or step == cfg.train.steps):
            return
        now = time.perf_counter()
        values = jax.device_get(metrics)
        values["tokens_per_s"] = tokens_per_step * (step - step_mark) / (now - t_mark)
        values["seq_len"] = schedule.length(step - 1)
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

    def save(step: int, position: dict) -> None:
        nonlocal saved
        flush()  # the step's metrics row is on disk before its checkpoint can be
        waited = ckpt.save(step, state, position, meta)
        saved = step
        log.info("step %d: checkpoint writing in the background; the loop waited %.3f s",
                 step, waited)  # fmt: skip

    def evaluate(step: int) -> None:
        result = evaluator(state["params"])
        writer.write(step, {f"eval_{k}": v for k, v in result.items()}, section="eval")
        log.info("step %d: eval loss %.4f, perplexity %.2f over %d tokens", step,
                 result["loss"], result["perplexity"], result["tokens"])  # fmt: skip
        last.update({f"eval_{k}": float(v) for k, v in result.items()})

    def samples(step: int) -> None:
        pairs = sampler(state["params"])
        writer.write_samples(step, pairs)
        for prompt, text in pairs:
            log.info("step %d sample: %r -> %r", step, prompt, text)

    profiler = Profiler(workdir / "tensorboard", start, cfg.train.profile_steps, cfg.train.steps)
    step = start
    try:
        with StopRequest() as stop:
            for step in range(start, cfg.train.steps):
                position = batches.get_state()  # where the data stands before this step's batch
                try:
                    host_batch = next(batches)
                except DataError:
                    if step > start:  # keep the steps done so far (data.strict stopped the run)
                        save(step, position)
                        log.error("saved step %d to %s before stopping", step, ckpt.directory)
                    raise
                stats = host_batch.pop("stats")
                new_length = step > start and step in schedule.starts()
                if step == start or new_length:
                    rows = len(host_batch["tokens"]) * jax.process_count()
                    note = " (the step compiles for this length)" if new_length else ""
                    log.info("step %d: rows of %d tokens, %d per batch%s", step,
                             schedule.length(step), rows, note)  # fmt: skip
                if new_length:
                    flush()  # the phase before ends its timing before this compile
                profiler.before(step)
                state, metrics = step_fn(state, sharding.global_batch(host_batch, mesh))
                profiler.after(step, state)
                if new_length:  # and the new phase starts its timing after it
                    t_mark, step_mark = time.perf_counter(), step
                if pending is not None:
                    report(*pending)
                pending = (step + 1, metrics, stats)
                stopping = stop.should_stop(step + 1)
                faulty = in_a_row >= cfg.train.max_nonfinite_steps
                last_step = step + 1 == cfg.train.steps
                busy = stopping or faulty
                if evaluator.batches and not busy and _due(cfg.train.eval_every, step + 1,
                                                           last_step):  # fmt: skip
                    flush()
                    evaluate(step + 1)  # before the save: a kill then cannot lose its row
                if not busy and _due(sampler.every, step + 1, last_step):
                    samples(step + 1)
                if faulty:
                    fault = f"{in_a_row} steps in a row"  # up to `step`: read one step late
                if stopping or faulty or (step + 1) % cfg.train.checkpoint_every == 0 or last_step:
                    save(step + 1, batches.get_state())
                if faulty:
                    ckpt.wait()
                    raise NonFiniteError(
                        f"{fault} (train.max_nonfinite_steps="
                        f"{cfg.train.max_nonfinite_steps}) had a non-finite loss or gradient, up "
                        f"to step {step}; saved step {saved} to {ckpt.directory / str(saved)}. "
                        "Lower optimizer.peak_lr, keep optimizer.grad_clip on, use bfloat16 "
                        "rather than float16, or look for broken data near this step"
                    )
                if stopping:
                    ckpt.wait()
                    where = ckpt.directory / str(saved)
                    log.info("stopped by %s: saved step %d to %s; run the same command to "
                             "resume", stop.signal_name, saved, where)  # fmt: skip
                    return last
            flush()
            ckpt.wait()  # under the handlers: a signal now cannot cut the last save short
    finally:
        profiler.close()
        writer.close()
        bar.close()
    if last:
        log.info("finished at step %d: %s", last["step"], json.dumps(last))
        if jax.process_index() == 0:
            from hanuman_jax.plot import plot  # matplotlib: imported only when there is a plot

            log.info("loss, learning rate and throughput plotted in %s", plot(workdir))
    skipped = {k: v for k, v in stats_metrics(data_stats).items() if "skipped" in k and v}
    if skipped:
        log.warning("unusable records skipped (this process): %s", skipped)
    return last
