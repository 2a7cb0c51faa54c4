"""The full recipe model (1.45B parameters) on a Colab TPU, sharded with FSDP (ZeRO-3) over the
devices it finds (`mesh.fsdp=-1`): parameters, gradients and AdamW state split over the 8 cores of
a v2-8 or the 8 chips of a v5e-8, each device computing its own sequences; whole on the one chip
of a v5e-1 or v6e-1. A step is 64 sequences of 2,048 tokens in 8 micro-batches: one sequence per
device each on 8 devices, 8 on one chip.

Per device by the planner, `python -m hanuman_jax.memory --config configs/colab_tpu.py
--device D [overrides]`:

- v2-8: 4.84 GiB, 61 % of a core's 8 GiB.
- v5e-8: 4.84 GiB, 30 % of a chip's 16 GiB.
- v6e-1: 30.63 GiB, 96 % of 32 GiB. `--config.train.grad_accum_steps=64` (64 micro-batches of
  one sequence, the same step) leaves more room: 28.50 GiB, 89 %.
- v5e-1: 30.63 GiB, 191 % of 16 GiB; 178 % with 64 micro-batches. The float32 weights, their
  AdamW moments, the gradients and their running sum alone are 27 GiB. It fits with
  `--config.model.param_dtype=bfloat16 --config.train.grad_accum_steps=64`: 14.88 GiB, 93 %.
  Weights and AdamW state in bfloat16 lose every update under half a bfloat16 step (1/512 to
  1/256 of the weight): the RMSNorm scales (near 1) never move at the recipe's learning rates,
  nor weights of 0.02 at its final 3e-5. It trains, worse than float32: try the pipeline on a
  v5e-1 and make the real run on a v6e-1 or an 8-device TPU.

The recipe's 8,192-token rows (`--config.data.seq_len=8192`, 4x the tokens per step) plan at
6.00 GiB per v2 core (75 %), with splash attention and the loss cutting long sequences into
pieces. Every field not set here is configs/hanuman_1b_moe.py's (read from that file, so the two
never drift apart).
"""

from pathlib import Path

import ml_collections

from hanuman_jax.config import load_config


def get_config() -> ml_collections.ConfigDict:
    cfg = load_config(Path(__file__).with_name("hanuman_1b_moe.py"))  # validated, locked

    cfg.model.dtype = "bfloat16"  # TPUs compute in bfloat16 natively
    cfg.model.param_dtype = "float32"  # master weights and AdamW state (v5e-1: see above)
    cfg.model.remat = "full"  # keep one block's activations at a time
    cfg.model.attention = "auto"  # auto: Pallas splash attention on a TPU, XLA's elsewhere
    cfg.model.attention_block = 512  # xla attention: N query rows at a time (N x T scores); 0 = all
    cfg.data.seq_len = 2048  # tokens per packed training row
    cfg.data.seq_len_schedule = []  # 2048 throughout
    cfg.train.batch_size = 64  # global sequences per step (131,072 tokens)
    cfg.train.grad_accum_steps = 8  # micro-batches: one sequence per device each on 8 devices
    cfg.train.steps = 610_000  # optimizer steps: 80B tokens (stage A) at 64 x 2048 per step
    cfg.train.checkpoint_every = 1000  # steps between checkpoints (and one at the end)
    cfg.mesh.data = 1  # no pure data parallelism: FSDP already splits the batch
    cfg.mesh.fsdp = -1  # ZeRO-3 over all the devices found: 8 cores or chips, or 1 chip
    cfg.mesh.expert = 1  # experts stay whole on every device
    cfg.mesh.tensor = 1  # no tensor parallelism
    return cfg
