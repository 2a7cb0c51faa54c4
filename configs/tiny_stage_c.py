"""configs/stage_c_sft.py at tiny's size: chat fine-tuning on the bundled sample chats (loss on
the assistant's tokens only), from a tiny_stage_b run's checkpoint (train.init_from)."""

from pathlib import Path

import ml_collections

from hanuman_jax.config import load_config


def get_config() -> ml_collections.ConfigDict:
    cfg = load_config(Path(__file__).with_name("tiny.py"))  # validated, locked

    cfg.train.init_from = "runs/tiny_stage_b"  # the stage B (tiny) workdir
    cfg.data.sources = [{"path": "bundled:chat.jsonl", "weight": 1.0}]  # chats: messages rows
    cfg.data.packing = "whole"  # a conversation is never split across rows
    cfg.train.steps = 60  # optimizer steps
    cfg.optimizer.peak_lr = 3e-4  # fine-tuning: a tenth of tiny's
    cfg.train.checkpoint_every = 30  # steps between checkpoints (and one at the end)
    cfg.train.sample_chat = True  # samples answer the prompts as chats
    return cfg
