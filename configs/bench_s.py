"""The CPU speed benchmark shape (issue 8): scripts/bench_train.py times it against PyTorch.

Every other field is configs/tiny.py's, read from that file, so the two never drift apart.
"""

from pathlib import Path

import ml_collections

from hanuman_jax.config import load_config


def get_config() -> ml_collections.ConfigDict:
    cfg = load_config(Path(__file__).with_name("tiny.py"))  # validated, locked

    cfg.model.vocab_size = 8000  # embedding rows; the benchmark feeds random ids below this
    cfg.model.d_model = 256  # residual stream width
    cfg.model.num_heads = 4  # query heads
    cfg.model.num_kv_heads = 2  # key/value heads (grouped-query attention)
    cfg.model.ffn_hidden = 704  # SwiGLU hidden width of each expert
    cfg.model.dtype = "float32"  # compute dtype
    cfg.model.param_dtype = "float32"  # dtype parameters are stored and updated in
    cfg.model.moe.num_experts = 8  # experts per MoE layer
    cfg.model.moe.top_k = 2  # experts each token is sent to
    cfg.model.num_layers = 4  # decoder blocks
    cfg.data.seq_len = 256  # tokens per training row
    cfg.train.batch_size = 8  # global sequences per step
    return cfg
