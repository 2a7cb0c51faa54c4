"""Orbax checkpoints: the train state, each process's Grain iterator state, and JSON metadata."""

from __future__ import annotations

import json
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves `{state, data, meta}` under `WORKDIR/checkpoints/<step>/`, asynchronously.

    Orbax writes each step to a temporary directory and renames it when complete, so a step that
    `all_steps()` lists was written whole. Grain writes one iterator state per process.
    """

    def __init__(self, directory: str | Path, *, keep: int):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "data", "meta"), options=options
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        """`data_state`: the iterator's `get_state()` taken at this step (an async save must not
        read the iterator later, after the loop has consumed more batches)."""
        position = _Position(data_state)
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(item=position),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def restore(self, step: int, abstract_state, data_iterator):
        """Restores into `abstract_state`'s structure, dtypes and shardings, and the iterator."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(item=data_iterator),
            ),
        )
        return restored["state"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class _Position:
    """A captured iterator state; Grain's handler writes non-DatasetIterator states as bytes."""

    def __init__(self, state: dict):
        self.state = json.dumps(state, indent=1).encode()

    def get_state(self) -> bytes:
        return self.state


def abstract_with_shardings(abstract_state, shardings):
    """ShapeDtypeStructs carrying the target shardings, for restoring straight onto the mesh."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )
