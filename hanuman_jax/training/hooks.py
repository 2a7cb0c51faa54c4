"""What the train loop calls between steps: metrics rows, evaluation, samples, saves, profiles."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from hanuman_jax.data.pipeline import stats_metrics
from hanuman_jax.data.schedule import SeqLenSchedule
from hanuman_jax.training.metrics import MetricsWriter, ProgressBar
from hanuman_jax.training.utilization import Utilization

log = logging.getLogger("hanuman_jax")


@dataclasses.dataclass
class Run:
    """What the loop shares with its hooks: the state after `step` steps and what was read of it."""

    state: dict
    step: int  # steps done
    saved: int  # the newest step saved (the step the run started at, until its first save)
    last: dict = dataclasses.field(default_factory=dict)  # newest metrics row (+ eval), as floats
    in_a_row: int = 0  # non-finite steps in a row, as of the newest step read
    data_stats: dict = dataclasses.field(default_factory=dict)  # this process's, newest read


@dataclasses.dataclass(frozen=True)
class Hook:
    """`fn(run)` every `every` steps and after the last one (0: never); `at_stop`: also when the
    run stops early (preempted, or too many non-finite steps), and only those hooks then."""

    fn: Callable[[Run], None]
    every: int
    at_stop: bool = False

    def due(self, step: int, end: int, *, stopping: bool) -> bool:
        """Whether the hook runs after `step` steps of `end`."""
        if stopping:
            return self.at_stop
        return self.every > 0 and (step % self.every == 0 or step == end)


def process_sum(stats: dict) -> dict:
    """Sums host-side counters over processes (each process counts only its own lanes)."""
    if jax.process_count() == 1:
        return stats
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(
        {k: np.asarray(v) for k, v in stats.items()}, tiled=False
    )
    return {k: np.asarray(v).sum(axis=0) for k, v in gathered.items()}


class MetricsLog:
    """A row every `every` steps (and after the first and last), each step's device metrics read
    when the next step has been dispatched, so that the host never waits on the device to log."""

    def __init__(
        self,
        writer: MetricsWriter,
        bar: ProgressBar,
        schedule: SeqLenSchedule,
        *,
        start: int,
        end: int,
        every: int,
        tokens_per_step: int,
        utilization: Utilization | None = None,
    ):
        self.writer, self.bar, self.schedule = writer, bar, schedule
        self.start, self.end, self.every, self.tokens_per_step = start, end, every, tokens_per_step
        self.utilization = utilization
        self.pending: tuple | None = None  # (step, device metrics, data stats), not yet read
        self.restart_timing(start)

    def restart_timing(self, step: int) -> None:
        """Throughput is measured from now, as if `step` steps were done (after a compile)."""
        self.t_mark, self.step_mark = time.perf_counter(), step

    def push(self, run: Run, metrics: dict, stats: dict) -> None:
        """Holds the metrics of step `run.step` and reads those of the step before."""
        self.flush(run)
        self.pending = (run.step, metrics, stats)

    def flush(self, run: Run) -> None:
        """Reads the held metrics now (before a save, an evaluation, or a compile is timed)."""
        if self.pending is not None:
            self._read(run, *self.pending)
            self.pending = None

    def _read(self, run: Run, step: int, metrics: dict, stats: dict) -> None:
        self.bar.update(step)
        run.data_stats = stats
        run.in_a_row = int(jax.device_get(metrics["nonfinite_in_a_row"]))
        if not (step == self.start + 1 or step % self.every == 0 or step == self.end):
            return
        now = time.perf_counter()
        values = jax.device_get(metrics)
        steps_timed, seconds = step - self.step_mark, now - self.t_mark
        values["tokens_per_s"] = self.tokens_per_step * steps_timed / seconds
        values["seq_len"] = self.schedule.length(step - 1)
        if self.utilization:
            values |= self.utilization.row(values["tokens_per_s"], values["seq_len"])
        values |= stats_metrics(process_sum(stats))
        self.t_mark, self.step_mark = now, step
        self.writer.write(step, values)
        self.bar.update(step, values)
        run.last = {"step": step, **{k: float(v) for k, v in values.items()}}


class Saver:
    """A checkpoint of the run's state and data position, written in the background."""

    def __init__(self, ckpt, meta: dict, batches, metrics: MetricsLog):
        self.ckpt, self.meta, self.batches, self.metrics = ckpt, meta, batches, metrics

    def __call__(self, run: Run, position: dict | None = None) -> None:
        """Saves step `run.step`; `position`: the data's, if not where `batches` stands now."""
        self.metrics.flush(run)  # the step's metrics row is on disk before its checkpoint can be
        position = self.batches.get_state() if position is None else position
        waited = self.ckpt.save(run.step, run.state, position, self.meta)
        run.saved = run.step
        log.info("step %d: checkpoint writing in the background; the loop waited %.3f s",
                 run.step, waited)  # fmt: skip


class EvalHook:
    """`evaluate(params)`'s results as an `eval` row of metrics.jsonl and `eval_*` in `run.last`."""

    def __init__(
        self, evaluate: Callable[[dict], dict], writer: MetricsWriter, metrics: MetricsLog
    ):
        self.evaluate, self.writer, self.metrics = evaluate, writer, metrics

    def __call__(self, run: Run) -> None:
        self.metrics.flush(run)  # the step's train row comes before its eval row
        result = self.evaluate(run.state["params"])
        self.writer.write(run.step, {f"eval_{k}": v for k, v in result.items()}, section="eval")
        log.info("step %d: eval loss %.4f, perplexity %.2f, %.4f bits per byte over %d tokens",
                 run.step, result["loss"], result["perplexity"], result["bits_per_byte"],
                 result["tokens"])  # fmt: skip
        run.last.update({f"eval_{k}": float(v) for k, v in result.items()})


class SampleHook:
    """`sample(params)`'s (prompt, text) pairs as rows of samples.jsonl and lines of the log."""

    def __init__(self, sample: Callable[[dict], list[tuple[str, str]]], writer: MetricsWriter):
        self.sample, self.writer = sample, writer

    def __call__(self, run: Run) -> None:
        pairs = self.sample(run.state["params"])
        self.writer.write_samples(run.step, pairs)
        for prompt, text in pairs:
            log.info("step %d sample: %r -> %r", run.step, prompt, text)


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
        """Starts the trace if step index `step` is the window's first."""
        if self.first <= step <= self.last and not self.active:
            jax.profiler.start_trace(str(self.directory))
            self.active, self.traced = True, step

    def after(self, step: int, state) -> None:
        """Ends the trace after the window's last step, once `state` is computed."""
        if self.active:
            self.traced = step
            if step == self.last:
                self.close(state)

    def close(self, state=None) -> None:
        """Ends a trace still open (a run stopped inside the window)."""
        if self.active:
            if state is not None:
                jax.block_until_ready(state)  # the traced steps' device work, whole
            jax.profiler.stop_trace()
            self.active = False
            log.info("profile of steps %d-%d written to %s (TensorBoard: Profile)",
                     self.first + 1, self.traced + 1, self.directory)  # fmt: skip
