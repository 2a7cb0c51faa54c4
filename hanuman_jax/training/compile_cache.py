"""XLA's persistent compilation cache for a run (`train.compilation_cache`): a runtime that
restarts and resumes (a Colab session cut off, a preempted TPU) loads its compiled steps from
disk instead of compiling them again. BENCHMARKS.md has the time to first step with and without.

The cache sits in the workdir by default, so that it lives where the checkpoints do (on Drive in
the Colab notebooks); an absolute path shares one cache between runs. JAX keys each entry by the
program, the devices and the jax/XLA versions, so a changed config or an upgraded jax compiles
afresh rather than loading a stale entry, and it writes only programs that took at least
`jax_persistent_cache_min_compile_time_secs` (1 s) to compile, and only from process 0 (so
several hosts need one shared folder for all of them to load it). Treat the folder as code: do
not share it with people you do not trust."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

log = logging.getLogger("hanuman_jax")

_HIT = "/jax/compilation_cache/cache_hits"
_hits = 0
_lock = threading.Lock()


def _count(event: str, **_) -> None:
    global _hits
    if event == _HIT:
        with _lock:
            _hits += 1


jax.monitoring.register_event_listener(_count)


def hits() -> int:
    """Compiled programs this process has loaded from a persistent cache so far."""
    return _hits


@contextlib.contextmanager
def persistent_cache(folder: str, workdir: Path) -> Iterator[Path | None]:
    """Compiles under `folder` (relative: inside `workdir`; '' for none) until the block ends,
    then puts back the cache the process had. A cache set for the whole process
    (JAX_COMPILATION_CACHE_DIR, or jax.config) takes precedence: it is kept, and said so."""
    outside = jax.config.jax_compilation_cache_dir
    if outside or not folder:
        if outside and folder:
            log.info("compilation cache: %s, set outside the config (train.compilation_cache is "
                     "not used)", outside)  # fmt: skip
        yield Path(outside) if outside else None
        return
    path = workdir / folder
    jax.config.update("jax_compilation_cache_dir", str(path))
    compilation_cache.reset_cache()  # JAX decides once per process whether to use a cache
    try:
        yield path
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()
