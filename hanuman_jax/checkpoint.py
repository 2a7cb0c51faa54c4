"""Orbax checkpoints of the train state plus JSON metadata (data iterator state, config)."""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves `{state, meta}` under `WORKDIR/checkpoints/<step>/`, asynchronously.

    Orbax writes each step to a temporary directory and renames it when complete, so a step that
    `all_steps()` lists was written whole.
    """

    def __init__(self, directory: str | Path, *, keep: int):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "meta"), options=options
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state) -> tuple[dict, dict]:
        """Restores into `abstract_state`'s structure, dtypes and shardings."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract_state, shardings):
    """ShapeDtypeStructs carrying the target shardings, for restoring straight onto the mesh."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )
