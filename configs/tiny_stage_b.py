"""configs/stage_b_thai_lapt.py at tiny's size: Thai-heavy continued pretraining of a tiny run, on
the bundled sample, from that run's checkpoint (train.init_from)."""

from pathlib import Path

import ml_collections

from hanuman_jax.config import load_config


def get_config() -> ml_collections.ConfigDict:
    cfg = load_config(Path(__file__).with_name("tiny.py"))  # validated, locked

    cfg.train.init_from = "runs/tiny"  # the stage A (tiny) workdir: its newest whole checkpoint
    cfg.data.sources = [  # Thai-heavy; some English and code-switching replayed against forgetting
        {"path": "bundled:thai.txt", "weight": 0.8},
        {"path": "bundled:english.txt", "weight": 0.1},
        {"path": "bundled:mixed.txt", "weight": 0.1},
    ]
    cfg.train.steps = 100  # optimizer steps
    cfg.optimizer.peak_lr = 1e-3  # a third of tiny's: adapt, do not start over
    cfg.train.checkpoint_every = 50  # steps between checkpoints (and one at the end)
    cfg.train.eval_every = 25  # tiny's held-out text (data.eval_sources), and at the end
    return cfg
