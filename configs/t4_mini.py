"""A smaller recipe model for one 16 GB T4 (Colab's free GPU): float16 with dynamic loss scaling,
full remat, and micro-batches with gradient accumulation.

12 layers, d_model 640, GQA 10/2, 8-expert top-2 SwiGLU MoE (expert hidden 1792): 363M parameters,
115M active per token. `python -m hanuman_jax.memory --config configs/t4_mini.py --device
t4` checks that it fits. Every field not set here is configs/hanuman_1b_moe.py's (read from that
file, so the two never drift apart): the stage A mixture, AdamW, the schedule.
"""

from pathlib import Path

import ml_collections

from hanuman_jax.config import load_config


def get_config() -> ml_collections.ConfigDict:
    cfg = load_config(Path(__file__).with_name("hanuman_1b_moe.py"))  # validated, locked

    cfg.model.vocab_size = 32_000  # embedding rows: a 32k SentencePiece model (>= its pieces)
    cfg.model.num_layers = 12  # decoder blocks
    cfg.model.d_model = 640  # residual stream width
    cfg.model.num_heads = 10  # query heads (head_dim 64)
    cfg.model.num_kv_heads = 2  # key/value heads (grouped-query attention)
    cfg.model.ffn_hidden = 1792  # SwiGLU hidden width of each expert
    cfg.model.max_seq_len = 2048  # longest context the model is built for
    cfg.model.dtype = "float16"  # a T4 (compute capability 7.5) has fast float16, no bfloat16
    cfg.model.param_dtype = "float32"  # master weights and AdamW state stay float32
    cfg.model.remat = "full"  # keep one block's activations at a time
    cfg.model.attention = "xla"  # cuDNN flash attention needs compute capability 8.0+
    cfg.model.attention_block = 512  # xla attention: N query rows at a time (N x T scores); 0 = all
    cfg.model.rope.theta = 10_000.0  # RoPE base frequency
    cfg.model.rope.scaling = "none"  # no context extension
    cfg.model.rope.factor = 1.0  # context extension factor when scaling is on
    cfg.model.rope.original_context = 2048  # llama3 scaling: the context the base was meant for
    cfg.data.tokenizer = "tokenizers/hanuman_sp32k.model"  # 32k pieces; README: Tokenizer
    cfg.data.seq_len = 2048  # tokens per packed training row
    cfg.data.seq_len_schedule = [(0.0, 1024), (0.5, 2048)]  # half the run at 1024 tokens
    cfg.train.steps = 20_000  # optimizer steps: 1.3B tokens at 32 x 2048 per step
    cfg.train.batch_size = 32  # global sequences per step
    cfg.train.grad_accum_steps = 16  # micro-batches of 2 sequences (4,096 tokens) each
    cfg.train.checkpoint_every = 500  # a Colab session can end at any time
    cfg.mesh.data = 1  # one GPU
    cfg.mesh.fsdp = 1  # nothing to shard over
    return cfg
