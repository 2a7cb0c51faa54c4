"""The training loop: data, sharded state, checkpoints and logging around the jitted step."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from hanuman_jax import __version__, sharding
from hanuman_jax.checkpoint import files
from hanuman_jax.checkpoint.manager import (
    Checkpointer,
    abstract_with_shardings,
    check_resumable,
    init_params,
)
from hanuman_jax.config import ConfigError
from hanuman_jax.data import DataError, make_dataset, resolve_file
from hanuman_jax.data.pipeline import stats_metrics
from hanuman_jax.data.schedule import SeqLenSchedule
from hanuman_jax.inference.evaluate import summary
from hanuman_jax.model import build
from hanuman_jax.planning import memory
from hanuman_jax.tokenizer import Tokenizer
from hanuman_jax.training import compile_cache
from hanuman_jax.training.hooks import (
    EvalHook,
    Hook,
    MetricsLog,
    Profiler,
    Run,
    SampleHook,
    Saver,
    process_sum,
)
from hanuman_jax.training.metrics import MetricsWriter, ProgressBar
from hanuman_jax.training.preemption import StopRequest
from hanuman_jax.training.step import (
    build_setup,
    inference_setup,
    init_state,
    jit_eval_step,
    jit_train_step,
    target_mask,
)
from hanuman_jax.training.utilization import Utilization
from hanuman_jax.training.workdir import hold

log = logging.getLogger("hanuman_jax")


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
    metrics. The workdir is held against a second trainer until then (workdir.py)."""
    with (
        hold(workdir, jax.process_index()),
        compile_cache.persistent_cache(cfg.train.compilation_cache, workdir),
    ):
        return _train(cfg, workdir, progress=progress)


def _train(cfg: ml_collections.ConfigDict, workdir: Path, *, progress: bool) -> dict:
    tokenizer = load_tokenizer(cfg)
    memory.check_fits(cfg, jax.device_count())  # before a typo's size builds anything
    setup = build_setup(cfg, sharding.make_mesh(cfg.mesh))
    meta = _run_meta(cfg, setup, tokenizer)
    batches = iter(make_dataset(cfg, tokenizer.path, process_index=jax.process_index(),
                                process_count=jax.process_count()))  # fmt: skip
    ckpt = Checkpointer(
        workdir / "checkpoints", keep=cfg.train.keep_checkpoints, tokenizer=tokenizer.path
    )
    try:
        start, state = _resume_or_init(cfg, setup, ckpt, batches, meta["tokenizer"]["sha256"])
        if jax.process_index() == 0:
            (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2) + "\n")
        if start >= cfg.train.steps:
            log.info(
                "%s is already at step %d of %d: nothing to do", workdir, start, cfg.train.steps
            )
            return {}
        trainer = Trainer(cfg, workdir, setup, batches, ckpt, meta, tokenizer=tokenizer.path,
                          start=start, progress=progress)  # fmt: skip
        return trainer.fit(Run(state=state, step=start, saved=start))
    finally:
        batches.close()  # stops the prefetch thread before interpreter shutdown
        ckpt.close()


def _run_meta(cfg: ml_collections.ConfigDict, setup, tokenizer: Tokenizer) -> dict:
    """What every checkpoint records of the run (and logs the model's size)."""
    counts = build.count_params(setup.model_cfg)
    log.info(
        "model: %s parameters, %s active per token; mesh %s",
        f"{counts['total']:,}",
        f"{counts['active']:,}",
        dict(setup.mesh.shape),
    )
    return {
        "config": cfg.to_dict(),
        "version": __version__,
        "parameters": counts,
        "tokenizer": files.tokenizer_meta(tokenizer.path, tokenizer.vocab_size),
    }


def _resume_or_init(cfg, setup, ckpt: Checkpointer, batches, tokenizer_sha: str) -> tuple:
    """(start step, state): the newest whole checkpoint's (and the data's position restored), else
    step 0 with `train.init_from`'s parameters or fresh ones."""
    target = abstract_with_shardings(setup.abstract_state, setup.state_shardings)
    resumed = ckpt.restore_newest(
        target, batches, lambda saved, where: check_resumable(cfg, saved, where, tokenizer_sha)
    )
    if resumed:
        log.info("resumed from %s at step %d", ckpt.directory / str(resumed[0]), resumed[0])
        if cfg.train.init_from:
            log.info("train.init_from is not read: the run goes on from its own checkpoint")
        return resumed
    params = None
    if cfg.train.init_from:
        params = init_params(cfg, setup.abstract_state["params"],
                             setup.state_shardings["params"], tokenizer_sha)  # fmt: skip
    return 0, init_state(setup, params)


def eval_batches(cfg: ml_collections.ConfigDict, tokenizer_path: Path) -> tuple[list[dict], int]:
    """The first `train.eval_batches` batches of `data.eval_sources` (the same set every time),
    and the UTF-8 bytes of text that their targets spell, summed over processes."""
    if not cfg.data.eval_sources:
        return [], 0
    ds = make_dataset(cfg, tokenizer_path, process_index=jax.process_index(),
                      process_count=jax.process_count(), eval_sources=True, prefetch=0)  # fmt: skip
    it = iter(ds)
    batches = [next(it) for _ in range(cfg.train.eval_batches)]
    tokenizer, nbytes = Tokenizer(tokenizer_path), 0
    for b in batches:
        b.pop("stats")
        bytes_BT = tokenizer.text_bytes(b["tokens"], b["loss_mask"])
        nbytes += int(np.sum(bytes_BT[:, 1:], where=target_mask(b)))
    return batches, int(process_sum({"bytes": np.int64(nbytes)})["bytes"])


class Evaluator:
    """Loss per predicted token and bits per byte of text over the fixed evaluation batches,
    computed by the model as it runs outside training (dropless MoE, no router noise): the
    model that is exported."""

    def __init__(self, setup, batches: list[dict], text_bytes: int):
        self.setup, self.batches, self.text_bytes = setup, batches, text_bytes
        self.step_fn = jit_eval_step(inference_setup(setup)) if batches else None

    def __call__(self, params) -> dict:
        nll, tokens = 0.0, 0
        for batch in self.batches:
            out = jax.device_get(
                self.step_fn(params, sharding.global_batch(batch, self.setup.mesh))
            )
            nll, tokens = nll + float(out["nll_sum"]), tokens + int(out["tokens"])
        return summary(nll, tokens, self.text_bytes)


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


class NonFiniteError(RuntimeError):
    """`train.max_nonfinite_steps` steps in a row had a non-finite loss or gradient."""


class Trainer:
    """Runs the jitted train step over the batches and calls hooks between steps: a metrics row
    read one step late, then evaluation, samples and a checkpoint as each falls due."""

    def __init__(self, cfg, workdir: Path, setup, batches, ckpt: Checkpointer, meta: dict, *,
                 tokenizer: Path, start: int, progress: bool = True):  # fmt: skip
        t, lead = cfg.train, jax.process_index() == 0
        self.workdir, self.setup, self.batches, self.ckpt = workdir, setup, batches, ckpt
        self.start, self.end, self.max_nonfinite = start, t.steps, t.max_nonfinite_steps
        self.schedule = SeqLenSchedule.from_config(cfg)
        self.step_fn = jit_train_step(setup)
        evaluator = Evaluator(setup, *eval_batches(cfg, tokenizer))
        sampler = Sampler(cfg, setup, tokenizer)
        # opened last, as fit() closes them: nothing after this may raise
        self.writer = MetricsWriter(workdir, resume_step=start, enabled=lead)
        self.bar = ProgressBar(t.steps, start, enabled=progress and lead)
        self.metrics = MetricsLog(
            self.writer, self.bar, self.schedule, start=start, end=t.steps, every=t.log_every,
            tokens_per_step=t.batch_size * cfg.data.seq_len,  # in every phase of the schedule
            utilization=Utilization(setup.model_cfg, list(setup.mesh.devices.flat)),
        )  # fmt: skip
        self.save = Saver(ckpt, meta, batches, self.metrics)
        self.hooks = [  # in this order: an eval row is on disk before the save that a kill may cut
            Hook(EvalHook(evaluator, self.writer, self.metrics),
                 t.eval_every if evaluator.batches else 0),
            Hook(SampleHook(sampler, self.writer), sampler.every),
            Hook(self.save, t.checkpoint_every, at_stop=True),
        ]  # fmt: skip
        self.profiler = Profiler(workdir / "tensorboard", start, t.profile_steps, t.steps)

    def fit(self, run: Run) -> dict:
        """Steps from `run.step` to `train.steps`, or to a stop; returns the last logged metrics."""
        try:
            with StopRequest() as stop:
                while run.step < self.end:
                    self.step(run)
                    if self.after_step(run, stop):
                        return run.last
                self.metrics.flush(run)
                self.ckpt.wait()  # under the handlers: a signal now cannot cut the last save short
        finally:
            self.profiler.close()
            self.writer.close()
            self.bar.close()
        self.finish(run)
        return run.last

    def step(self, run: Run) -> None:
        """One train step on the next batch; its metrics stay on the device until the next one."""
        step = run.step
        position = self.batches.get_state()  # where the data stands before this step's batch
        try:
            batch = next(self.batches)
        except DataError:
            if step > self.start:  # keep the steps done so far (data.strict stopped the run)
                self.save(run, position)
                log.error("saved step %d to %s before stopping", step, self.ckpt.directory)
            raise
        stats = batch.pop("stats")
        new_length = self.announce_length(run, batch)
        self.profiler.before(step)
        began, cached = time.perf_counter(), compile_cache.hits()
        run.state, metrics = self.step_fn(run.state, sharding.global_batch(batch, self.setup.mesh))
        if step == self.start:  # the call returns once the step is compiled and dispatched
            loaded = compile_cache.hits() > cached
            source = "loaded from the compilation cache" if loaded else "compiled"
            log.info("step %d: the train step %s in %.1f s", step, source,
                     time.perf_counter() - began)  # fmt: skip
        self.profiler.after(step, run.state)
        run.step = step + 1
        if new_length:  # the new phase starts its timing after its compile
            self.metrics.restart_timing(step)
        self.metrics.push(run, metrics, stats)

    def announce_length(self, run: Run, batch: dict) -> bool:
        """Logs the row length at the start and at each phase change; True at a phase change."""
        step = run.step
        new_length = step > self.start and step in self.schedule.starts()
        if step == self.start or new_length:
            rows = len(batch["tokens"]) * jax.process_count()
            note = " (the step compiles for this length)" if new_length else ""
            log.info("step %d: rows of %d tokens, %d per batch%s", step,
                     self.schedule.length(step), rows, note)  # fmt: skip
        if new_length:
            self.metrics.flush(run)  # the phase before ends its timing before this compile
        return new_length

    def after_step(self, run: Run, stop: StopRequest) -> bool:
        """Calls the hooks that are due; True when the run stops here (preempted)."""
        stopping = stop.should_stop(run.step)
        in_a_row = run.in_a_row  # up to the step before: metrics are read one step late
        faulty = in_a_row >= self.max_nonfinite
        for hook in self.hooks:
            if hook.due(run.step, self.end, stopping=stopping or faulty):
                hook.fn(run)
        if faulty:
            self.ckpt.wait()
            raise NonFiniteError(
                f"{in_a_row} steps in a row (train.max_nonfinite_steps={self.max_nonfinite}) had "
                f"a non-finite loss or gradient, up to step {run.step - 1}; saved step "
                f"{run.saved} to {self.ckpt.directory / str(run.saved)}. Lower "
                "optimizer.peak_lr, keep optimizer.grad_clip on, use bfloat16 rather than "
                "float16, or look for broken data near this step"
            )
        if stopping:
            self.ckpt.wait()
            log.info("stopped by %s: saved step %d to %s; run the same command to resume",
                     stop.signal_name, run.saved, self.ckpt.directory / str(run.saved))  # fmt: skip
        return stopping

    def finish(self, run: Run) -> None:
        """The closing log lines, and the plot of the run."""
        if run.last:
            log.info("finished at step %d: %s", run.last["step"], json.dumps(run.last))
            if jax.process_index() == 0:
                from hanuman_jax.plot import plot  # matplotlib: imported only when there is a plot

                log.info("loss, learning rate and throughput plotted in %s", plot(self.workdir))
        skipped = {k: v for k, v in stats_metrics(run.data_stats).items() if "skipped" in k and v}
        if skipped:
            log.warning("unusable records skipped (this process): %s", skipped)
