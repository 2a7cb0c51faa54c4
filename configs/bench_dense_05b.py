"""A dense ~0.5B model for GPU MFU (issue 8: target >= 45 % of one H100's bf16 peak).

The recipe's stack without experts: 24 layers, d_model 1024, GQA 16/4, SwiGLU hidden 4864,
vocab 32,000 (untied), 4,096 tokens per row: 0.49B parameters. Every other field is the
recipe's (configs/hanuman_1b_moe.py), read from that file, so the two never drift apart.

    python scripts/bench_train.py --config configs/bench_dense_05b.py --compare-torch
"""

from pathlib import Path

import ml_collections

from hanuman_jax.config import load_config


def get_config() -> ml_collections.ConfigDict:
    cfg = load_config(Path(__file__).with_name("hanuman_1b_moe.py"))  # validated, locked

    cfg.model.vocab_size = 32_000  # embedding rows; the benchmark feeds random ids below this
    cfg.model.d_model = 1024  # residual stream width
    cfg.model.num_heads = 16  # query heads (head_dim 64)
    cfg.model.num_kv_heads = 4  # key/value heads (grouped-query attention)
    cfg.model.ffn_hidden = 4864  # SwiGLU hidden width
    cfg.model.tie_embeddings = False  # separate LM head, as most 0.5B models have
    cfg.model.moe.num_experts = 0  # dense SwiGLU in every layer
    cfg.model.remat = "none"  # 4 x 4,096 tokens: 35 GiB on an H100 by the memory planner
    cfg.data.seq_len = 4096  # tokens per training row
    cfg.data.seq_len_schedule = []  # one length throughout
    cfg.train.batch_size = 4  # global sequences per step
    return cfg
