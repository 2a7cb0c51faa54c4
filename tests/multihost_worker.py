"""One process of a multi-host run on this machine (run by test_multihost.py, not by pytest).

    python tests/multihost_worker.py OUT.json NUM_PROCESSES PROCESS_ID PORT

Builds this process's lanes of the `tiny` data, assembles the global batch with
`jax.make_array_from_process_local_data`, trains 3 steps on a mesh over every process's devices,
and writes the gathered global batches and the losses.
"""

import json
import sys

import jax

out, num_processes, process_id, port = sys.argv[1], *map(int, sys.argv[2:])
if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from hanuman_jax import sharding  # noqa: E402
from hanuman_jax.config import load_config  # noqa: E402
from hanuman_jax.data import make_dataset  # noqa: E402
from hanuman_jax.step import build_setup, init_state, jit_train_step  # noqa: E402
from hanuman_jax.trainer import load_tokenizer  # noqa: E402

OVERRIDES = [
    "--config.model.num_layers=2",
    "--config.data.seq_len=32",
    "--config.train.batch_size=8",
    "--config.mesh.data=2",
    "--config.mesh.fsdp=2",
    "--config.mesh.expert=2",
]
cfg = load_config("configs/tiny.py", OVERRIDES)
tokenizer = load_tokenizer(cfg)
mesh = sharding.make_mesh(cfg.mesh)
setup = build_setup(cfg, mesh)
state = init_state(setup)
step = jit_train_step(setup)
batches = iter(make_dataset(cfg, tokenizer.path, process_index=jax.process_index(),
                            process_count=jax.process_count()))  # fmt: skip
result = {"devices": jax.device_count(), "local_devices": jax.local_device_count(),
          "tokens": [], "losses": []}  # fmt: skip
for _ in range(3):
    local = next(batches)
    local.pop("stats")
    batch = sharding.global_batch(local, mesh)
    gathered = multihost_utils.process_allgather(batch["tokens"], tiled=True)
    result["tokens"].append(np.asarray(gathered).tolist())
    state, metrics = step(state, batch)
    result["losses"].append(float(metrics["loss"]))
if jax.process_index() == 0:
    with open(out, "w") as f:
        json.dump(result, f)
