"""The full recipe model on one Colab TPU (v2-8 or v5e-8: 8 cores), sharded with FSDP (ZeRO-3):
parameters, gradients and AdamW state split 8 ways, each core computing its own sequences.

`python -m hanuman_jax.memory --config configs/colab_tpu.py --device v2-8` (or v5e-8) checks
that it fits. Sequences are 2,048 tokens (4.75 GiB per v2 core by the planner). The recipe's
8,192 (`--config.data.seq_len=8192`, 4x the tokens per step) plans at 5.6 GiB per v2 core, with
the attention in blocks of 512 query rows and the loss cutting long sequences into pieces; all
scores at once it would need 190 %. Every field not set here is configs/hanuman_1b_moe.py's
(read from that file, so the two never drift apart).
"""

from pathlib import Path

import ml_collections

from hanuman_jax.config import load_config


def get_config() -> ml_collections.ConfigDict:
    cfg = load_config(Path(__file__).with_name("hanuman_1b_moe.py"))  # validated, locked

    cfg.model.dtype = "bfloat16"  # TPUs compute in bfloat16 natively
    cfg.model.param_dtype = "float32"  # master weights and AdamW state stay float32
    cfg.model.remat = "full"  # keep one block's activations at a time
    cfg.model.attention = "auto"  # auto: Pallas splash attention on a TPU, XLA's elsewhere
    cfg.model.attention_block = 512  # xla attention: N query rows at a time (N x T scores); 0 = all
    cfg.data.seq_len = 2048  # tokens per packed training row
    cfg.data.seq_len_schedule = []  # 2048 throughout
    cfg.train.batch_size = 64  # global sequences per step (131,072 tokens)
    cfg.train.grad_accum_steps = 8  # micro-batches: one sequence per core each
    cfg.train.steps = 610_000  # optimizer steps: 80B tokens (stage A) at 64 x 2048 per step
    cfg.train.checkpoint_every = 1000  # steps between checkpoints (and one at the end)
    cfg.mesh.data = 1  # no pure data parallelism: FSDP already splits the batch
    cfg.mesh.fsdp = 8  # ZeRO-3 over the 8 cores
    cfg.mesh.expert = 1  # experts stay whole on every core
    cfg.mesh.tensor = 1  # no tensor parallelism
    return cfg
