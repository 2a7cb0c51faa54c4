"""A checkpoint step on disk: its directory, manifest, metadata and tokenizer copy.

`<root>/<step>/` holds the items Orbax writes (`state/`, `data/`, `meta/metadata`), a copy of the
run's tokenizer (`tokenizer/tokenizer.model`) and, written last, `manifest.json`: the size and
SHA-256 of every file in them. A step without a manifest, or with a file that no longer matches its
record (truncated, or changed in place: a flipped block, an edited metadata), is damaged.
Training and the Hugging Face import seal steps here; training's resume and `restore.load_params`
find and check them here.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hanuman_jax.config import ConfigError
from hanuman_jax.data.records import file_sha256

log = logging.getLogger("hanuman_jax")

MANIFEST = "manifest.json"
META = "meta/metadata"  # the `meta` item, as Orbax's JsonSave writes it
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE = "tokenizer.model"

T = TypeVar("T")


class CheckpointError(ConfigError):
    """A workdir's checkpoints cannot be used as they are; the message says which and why."""


class Damaged(CheckpointError):
    """A step's files are not whole or not readable; `reason` says which."""

    def __init__(self, step_dir: Path, reason: str):
        super().__init__(f"checkpoint {step_dir} is damaged: {reason}")
        self.reason = reason


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def missing(path: Path) -> str:
    """`PATH does not exist; ...` and what its nearest existing parent holds (runs first)."""
    parent = next((p for p in path.parents if p.is_dir()), None)
    if parent is None:
        return f"{path} does not exist"
    entries = sorted(p for p in parent.iterdir() if p.is_dir())
    runs = [p.name for p in entries if (p / "checkpoints").is_dir()]
    listing = ", ".join(runs) if runs else ", ".join(p.name for p in entries[:20]) or "nothing"
    what = "runs with checkpoints" if runs else "directories"
    return f"{path} does not exist; {what} in {parent}: {listing}"


def checkpoint_root(path: str | Path) -> Path:
    """Accepts a workdir (holding `checkpoints/`) or the `checkpoints/` directory itself."""
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise ConfigError(missing(path))
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if path.name == "checkpoints" or any(p.name.isdigit() for p in path.iterdir()):
        return path
    raise ConfigError(f"{path} holds no checkpoints/ directory: is it a training workdir?")


def saved_steps(root: Path) -> list[int]:
    """Steps whose save finished (Orbax renames a step's directory into place when complete)."""
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def tokenizer_meta(tokenizer: Path, vocab_size: int) -> dict:
    """What a step's metadata records of its tokenizer; `sha256` is what resumes compare."""
    return {"file": tokenizer.name, "vocab_size": vocab_size, "sha256": file_sha256(tokenizer)}


def tokenizer_copy(step_dir: Path) -> Path | None:
    copied = step_dir / TOKENIZER_DIR / TOKENIZER_FILE
    return copied if copied.is_file() else None


def seal(step_dir: Path, tokenizer: Path | None) -> None:
    """Adds the tokenizer copy, then the manifest of every file in the step's items; the
    manifest appears by a rename, so a step is never sealed half way."""
    if tokenizer is not None:
        (step_dir / TOKENIZER_DIR).mkdir(exist_ok=True)
        shutil.copyfile(tokenizer, step_dir / TOKENIZER_DIR / TOKENIZER_FILE)
    files = {
        str(p.relative_to(step_dir)): _record(p)
        for p in sorted(step_dir.rglob("*"))
        if p.is_file() and p.parent != step_dir  # Orbax rewrites its own top-level files
    }
    partial = step_dir / f"{MANIFEST}.partial"
    partial.write_text(json.dumps({"files": files}, indent=1))
    partial.rename(step_dir / MANIFEST)


def _record(path: Path) -> dict:
    """What the manifest keeps of one file: its size and the SHA-256 of its bytes. Training seals
    in Orbax's background thread, so hashing holds up the next save, never a train step."""
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def _mismatch(name: str, path: Path, record) -> str | None:
    """Why `path` no longer matches its manifest record, or None. The size is compared first (it
    costs nothing); a record that is an int is a size alone, as steps sealed before hashes have."""
    old = isinstance(record, int)
    written, digest = (record, None) if old else (record["size"], record["sha256"])
    size = path.stat().st_size
    if size != written:
        return f"{name} has {size} bytes, {written} were written"
    if digest is not None and file_sha256(path) != digest:
        return f"{name} was changed after it was written (its sha256 is not the one in {MANIFEST})"
    return None


def damage(step_dir: Path) -> str | None:
    """Why the checkpoint in `step_dir` is not whole (a file missing or truncated), or None."""
    try:
        files = json.loads((step_dir / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, record in files.items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        try:
            reason = _mismatch(name, path, record)
        except (KeyError, TypeError):
            return f"{MANIFEST} is unreadable (its record of {name})"
        except OSError as e:  # removed while read (an older step a save deleted), unreadable
            return f"{name} cannot be read ({e.strerror or e})"
        if reason:
            return reason
    return None


def check_whole(step_dir: Path) -> None:
    """Raises Damaged when `damage` finds the step not whole."""
    if reason := damage(step_dir):
        raise Damaged(step_dir, reason)


def read_meta(step_dir: Path) -> dict:
    """The step's `meta` item: the run's config, tokenizer, version, ...; Damaged if unreadable."""
    try:
        meta = json.loads((step_dir / META).read_text())
    except OSError as e:
        raise Damaged(step_dir, f"{META} is unreadable ({first_line(e)})") from None
    except ValueError as e:
        raise Damaged(step_dir, f"{META} is not valid JSON ({first_line(e)})") from None
    if not isinstance(meta, dict):
        raise Damaged(step_dir, f"{META} holds no JSON object")
    return meta


def newest_whole(
    root: Path, open_step: Callable[[Path], T]
) -> tuple[tuple[int, T] | None, list[tuple[int, str]]]:
    """((step, open_step(step dir)) of the newest step that is whole and opens, or None; and the
    (step, reason) of each newer one that is damaged or whose `open_step` raised Damaged).

    Each damaged step is named in one warning. Other errors of `open_step` (a checkpoint of
    another model) propagate."""
    damaged: list[tuple[int, str]] = []
    for step in reversed(saved_steps(root)):
        step_dir = root / str(step)
        try:
            check_whole(step_dir)
            return (step, open_step(step_dir)), damaged
        except Damaged as e:
            log.warning("checkpoint %s is damaged (%s); trying the one before", step_dir, e.reason)
            damaged.append((step, e.reason))
    return None, damaged


def listing(damaged: list[tuple[int, str]]) -> str:
    """`step 6: why; step 4: why` of `newest_whole`'s damaged steps."""
    return "; ".join(f"step {step}: {reason}" for step, reason in damaged)


def whole_before(root: Path, step: int) -> int | None:
    """The newest step before `step` that is whole, or None (to name it when `step` is not)."""
    return next((s for s in reversed(saved_steps(root)) if s < step and not damage(root / str(s))),
                None)  # fmt: skip
