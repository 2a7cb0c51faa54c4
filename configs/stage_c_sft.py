"""Stage C of the recipe: instruction fine-tuning of the stage B model, from its checkpoint, on the
seed's two chat datasets (a 10,000-row sample of each, through `datasets`: the `hf` extra) and
local chat files (2-4M chat / instruction pairs). Each source's row shape is detected and logged
(docs/data.md): the loss counts only the assistant's tokens, `<think>` blocks included, and
`whole` packing never splits a conversation.

Every other field is configs/hanuman_1b_moe.py's (stage A), read from that file.
"""

from pathlib import Path

import ml_collections

from hanuman_jax.config import load_config


def get_config() -> ml_collections.ConfigDict:
    cfg = load_config(Path(__file__).with_name("hanuman_1b_moe.py"))  # validated, locked

    cfg.train.init_from = "runs/stage_b_thai_lapt"  # the stage B workdir
    # The seed's sets are small against 1.8B tokens of training: by estimate, Thai chatbot rows
    # (2.7 MB: ~0.3M tokens) get ~6 passes at 0.001, 10k Intermediate-Thinking rows (~15M
    # tokens) ~3.5 at 0.029; data/source_N_token_share shows the real mix.
    cfg.data.sources = [  # the seed's datasets, then local chat files; weight = share of tokens
        {"path": "hf:ZombitX64/ThaiChatbotConversation", "weight": 0.001, "max_examples": 10_000},
        {"path": "hf:HelpingAI/Intermediate-Thinking-130k", "weight": 0.029,
         "max_examples": 10_000},  # instruction/input/output, answers opening with <think>
        {"path": "data/stage_c/thai_chat/*.jsonl", "weight": 0.47},
        {"path": "data/stage_c/english_chat/*.jsonl", "weight": 0.4},
        {"path": "data/stage_c/code_switch_chat/*.jsonl", "weight": 0.1},
    ]  # fmt: skip
    cfg.data.seq_len_schedule = []  # full length throughout
    cfg.data.packing = "whole"  # a conversation is never split across rows
    cfg.train.steps = 3_500  # one epoch of ~3M pairs of ~600 tokens at 64 x 8192 per step
    cfg.optimizer.peak_lr = 2e-5  # fine-tuning: small steps keep what stages A and B learned
    cfg.optimizer.warmup_fraction = 0.03  # share of the steps spent warming up linearly
    cfg.train.checkpoint_every = 500  # steps between checkpoints (and one at the end)
    cfg.train.sample_chat = True  # samples answer the prompts as chats
    return cfg
