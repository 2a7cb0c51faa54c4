"""Shared fixtures: small odd-sized model configs and the bundled sample assets."""

import os

os.environ.setdefault("XLA_FLAGS", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from hanuman_jax.config import ModelConfig, MoeConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def small_model_cfg(**overrides) -> ModelConfig:
    """Odd sizes so that a transposed axis cannot pass by accident."""
    moe = overrides.pop("moe", MoeConfig(num_experts=5, top_k=2, router_temperature=1.2))
    base = dict(
        vocab_size=103,
        num_layers=2,
        d_model=48,
        num_heads=6,
        num_kv_heads=2,
        ffn_hidden=40,
        max_seq_len=64,
        moe=moe,
    )
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def model_cfg() -> ModelConfig:
    return small_model_cfg()


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture(scope="module")
def shared_compile_cache(tmp_path_factory):
    """The module's runs (and other modules using it) share their compilations through JAX's
    persistent cache, in this session's temporary directory."""
    import jax
    from jax._src import compilation_cache

    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.getbasetemp() / "xla"))
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", before)
    compilation_cache.reset_cache()


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random parameters of `cfg`'s shapes, from numpy (initialising the model costs seconds):
    normal(0, init_std), and 1 + that for norm scales."""
    import jax
    import numpy as np

    from hanuman_jax.model.build import abstract_params

    rng = np.random.default_rng(seed)

    def draw(path, a):
        x = cfg.init_std * rng.standard_normal(a.shape)
        return (1.0 + x if path[-1].key == "scale" else x).astype(a.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(cfg))
