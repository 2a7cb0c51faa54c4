"""Stage C of the recipe: instruction fine-tuning (2-4M chat / instruction pairs) of the stage B
model, from its checkpoint. Rows are chats or instruction/response pairs (README, Data): the loss
counts only the assistant's tokens, and `whole` packing never splits a conversation.

Every other field is configs/hanuman_1b_moe.py's (stage A), read from that file.
"""

from pathlib import Path

import ml_collections

from hanuman_jax.config import load_config


def get_config() -> ml_collections.ConfigDict:
    cfg = load_config(Path(__file__).with_name("hanuman_1b_moe.py"))  # validated, locked

    cfg.train.init_from = "runs/stage_b_thai_lapt"  # the stage B workdir
    cfg.data.sources = [  # chat (messages) and instruction (instruction/input/output) rows
        {"path": "data/stage_c/thai_chat/*.jsonl", "weight": 0.5},
        {"path": "data/stage_c/english_chat/*.jsonl", "weight": 0.4},
        {"path": "data/stage_c/code_switch_chat/*.jsonl", "weight": 0.1},
    ]
    cfg.data.seq_len_schedule = []  # full length throughout
    cfg.data.packing = "whole"  # a conversation is never split across rows
    cfg.train.steps = 3_500  # one epoch of ~3M pairs of ~600 tokens at 64 x 8192 per step
    cfg.optimizer.peak_lr = 2e-5  # fine-tuning: small steps keep what stages A and B learned
    cfg.optimizer.warmup_fraction = 0.03  # share of the steps spent warming up linearly
    cfg.train.checkpoint_every = 500  # steps between checkpoints (and one at the end)
    cfg.train.sample_chat = True  # samples answer the prompts as chats
    return cfg
