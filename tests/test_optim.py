"""The learning-rate schedule: optax's warmup and cosine, equal to the formula they replace."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hanuman_jax.training.optim import lr_schedule

EPS = float(np.finfo(np.float32).eps)


def _cfg(peak, ratio, fraction, steps):
    return ml_collections.ConfigDict({
        "optimizer": {"peak_lr": peak, "min_lr_ratio": ratio, "warmup_fraction": fraction},
        "train": {"steps": steps},
    })  # fmt: skip


def _hand_written(peak, ratio, fraction, steps):
    """The formula hanuman_jax used before optax's schedules (kept here as the reference)."""
    warmup, floor = math.ceil(fraction * steps), peak * ratio

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * (step + 1.0) / max(warmup, 1)
        progress = jnp.clip((step - warmup) / max(steps - warmup, 1), 0.0, 1.0)
        cosine = floor + 0.5 * (peak - floor) * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


CASES = [  # (peak, min_lr_ratio, warmup_fraction, steps)
    (1e-3, 0.1, 0.05, 20),  # tiny: one warmup step
    (6e-4, 0.1, 0.02, 1000),
    (3e-4, 0.0, 0.3, 97),  # decays to 0, odd lengths
    (1e-3, 0.1, 0.0, 50),  # no warmup
    (1e-3, 0.1, 0.0, 1),  # one step, no warmup
    (1e-3, 0.1, 0.5, 1),  # one step, which is the warmup
    (2e-5, 1.0, 0.01, 300),  # constant after warmup
    (1e-3, 0.05, 0.99, 7),  # nearly all warmup
]


@pytest.mark.parametrize("case", CASES)
def test_optax_schedule_equals_the_hand_written_one_at_every_step(case):
    """Within 2 float32 eps of the peak (a few ulps: optax orders the same arithmetic otherwise).
    Resuming is still bit-exact: a run recomputes the rate from the step with the same code."""
    peak, _, _, steps = case
    step_S = jnp.arange(steps + 2, dtype=jnp.int32)  # and past the end, where it stays
    want_S = np.asarray(jax.jit(jax.vmap(_hand_written(*case)))(step_S))
    schedule = lr_schedule(_cfg(*case))
    got_S = np.asarray(jax.jit(jax.vmap(schedule))(step_S))
    assert got_S.dtype == np.float32
    np.testing.assert_allclose(got_S, want_S, rtol=0, atol=2 * EPS * peak)
    again_S = np.asarray(jax.jit(jax.vmap(lr_schedule(_cfg(*case))))(step_S))
    np.testing.assert_array_equal(again_S, got_S)  # a resumed run computes the same rates


def test_schedule_landmarks():
    peak, ratio, steps = 1e-3, 0.1, 40
    schedule = lr_schedule(_cfg(peak, ratio, 0.1, steps))  # 4 warmup steps
    got = [float(schedule(s)) for s in range(steps + 1)]
    assert got[:4] == pytest.approx([peak / 4, peak / 2, 3 * peak / 4, peak], rel=1e-6)
    assert got[4] == pytest.approx(peak, rel=1e-6)  # the cosine starts at the peak
    assert all(a > b for a, b in zip(got[4:], got[5:], strict=False))  # then only falls
    assert got[-1] == pytest.approx(peak * ratio, rel=1e-5)
    assert float(lr_schedule(_cfg(peak, ratio, 0.0, 1))(0)) == pytest.approx(peak)
