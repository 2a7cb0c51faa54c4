"""Stage B of the recipe: Thai language-adaptive pretraining (5B tokens, Thai-heavy) of the stage A
model, from its checkpoint: parameters only, with a fresh optimizer, schedule and data.

Every other field is configs/hanuman_1b_moe.py's (stage A), read from that file, so the model
cannot drift from the checkpoint it starts from.
"""

from pathlib import Path

import ml_collections

from hanuman_jax.config import load_config


def get_config() -> ml_collections.ConfigDict:
    cfg = load_config(Path(__file__).with_name("hanuman_1b_moe.py"))  # validated, locked

    cfg.train.init_from = "runs/hanuman_1b_moe"  # the stage A workdir: its newest whole checkpoint
    cfg.data.seq_len_schedule = []  # stage A ends at full length; B stays there
    cfg.data.sources = [  # Thai-heavy; some English and code-switching replayed against forgetting
        {"path": "data/stage_b/thai/*.jsonl", "weight": 0.8},
        {"path": "data/stage_a/english/*.jsonl", "weight": 0.1},
        {"path": "data/stage_a/code_switch/*.jsonl", "weight": 0.1},
    ]
    cfg.train.steps = 9_540  # 5B tokens at 64 x 8192 per step
    cfg.optimizer.peak_lr = 1e-4  # a third of stage A's: adapt, do not start over
    cfg.optimizer.warmup_fraction = 0.01  # rewarm briefly: the optimizer state starts fresh
    cfg.train.checkpoint_every = 500  # steps between checkpoints (and one at the end)
    return cfg
