"""Stopping cleanly when asked (SIGTERM from a preempting scheduler, SIGINT from Ctrl-C): the loop
finishes its step, saves, and the run exits 0."""

from __future__ import annotations

import logging
import signal
import threading

import jax

log = logging.getLogger("hanuman_jax")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """While entered, SIGTERM and SIGINT set `signal_name` instead of killing the process.

    With several processes, JAX's preemption service (started by `jax.distributed.initialize`)
    owns SIGTERM and agrees with every process on the step to stop at, so that all of them save
    the same step: `should_stop` asks it instead.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}
        self._multi = jax.process_count() > 1

    def __enter__(self) -> StopRequest:
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            log.warning("%s: stopping after this step, once its checkpoint is written", name)
        else:  # a second signal must not interrupt a save half way
            log.warning("%s: already stopping; waiting for the checkpoint to be written", name)

    def should_stop(self, step: int) -> bool:
        """Call once per step, with the step just done (every process, the same steps)."""
        if self._multi:
            from jax.experimental import multihost_utils

            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self.signal_name = "preemption notice"
            except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
                pass
        return self.signal_name is not None
