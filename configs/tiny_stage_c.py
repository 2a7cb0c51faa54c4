"""configs/stage_c_sft.py at tiny's size: chat fine-tuning (loss on the assistant's tokens only),
from a tiny_stage_b run's checkpoint (train.init_from), on the same kinds of sources: two `hf:`
datasets (bundled folders in shapes like the seed's: Thai transcripts with speaker tags, and
instruction/input/output rows with <think> blocks; the `hf` extra reads them) and local chats."""

from pathlib import Path

import ml_collections

from hanuman_jax.config import load_config


def get_config() -> ml_collections.ConfigDict:
    cfg = load_config(Path(__file__).with_name("tiny.py"))  # validated, locked

    cfg.train.init_from = "runs/tiny_stage_b"  # the stage B (tiny) workdir
    cfg.data.sources = [  # token shares; max_examples: a seeded sample of that many rows
        {"path": "hf:bundled:thai_chatbot", "weight": 0.2, "max_examples": 20},
        {"path": "hf:bundled:thinking", "weight": 0.3, "max_examples": 10},
        {"path": "bundled:chat.jsonl", "weight": 0.5},  # chats: messages rows
    ]
    cfg.data.packing = "whole"  # a conversation is never split across rows
    cfg.train.steps = 60  # optimizer steps
    cfg.optimizer.peak_lr = 3e-4  # fine-tuning: a tenth of tiny's
    cfg.train.checkpoint_every = 30  # steps between checkpoints (and one at the end)
    cfg.data.eval_sources = [{"path": "bundled:heldout/chat.jsonl"}]  # held-out chats
    cfg.train.eval_every = 20  # steps between evaluations (and one at the end)
    cfg.train.sample_every = 30  # chat samples in samples.jsonl (and at the end)
    cfg.train.sample_prompts = ["แนะนำอาหารเช้าหน่อย", "How can I sleep better?"]  # user turns
    cfg.train.sample_chat = True  # samples answer the prompts as chats
    return cfg
