"""Configs: `configs/*.py` files loaded and overridden (load.py), and their sections as frozen
dataclasses that check their own fields (model.py, sections.py, mesh.py; rules in fields.py)."""

from hanuman_jax.config.fields import ConfigError
from hanuman_jax.config.load import SECTIONS, apply_override, check_across, load_config, validate
from hanuman_jax.config.mesh import BATCH_AXES, MESH_AXES, MeshConfig, check_batch_divides
from hanuman_jax.config.model import (
    ATTENTION_IMPLS,
    DISPATCHES,
    DTYPES,
    GROUPED_MATMULS,
    PARAM_DTYPES,
    REMAT_MODES,
    ROPE_SCALINGS,
    ModelConfig,
    MoeConfig,
    RopeConfig,
)
from hanuman_jax.config.sections import (
    MAX_LOSS_SCALE,
    PACKING_MODES,
    DataConfig,
    OptimizerConfig,
    TrainConfig,
)

__all__ = [
    "ATTENTION_IMPLS",
    "BATCH_AXES",
    "DISPATCHES",
    "DTYPES",
    "GROUPED_MATMULS",
    "MAX_LOSS_SCALE",
    "MESH_AXES",
    "PACKING_MODES",
    "PARAM_DTYPES",
    "REMAT_MODES",
    "ROPE_SCALINGS",
    "SECTIONS",
    "ConfigError",
    "DataConfig",
    "MeshConfig",
    "ModelConfig",
    "MoeConfig",
    "OptimizerConfig",
    "RopeConfig",
    "TrainConfig",
    "apply_override",
    "check_across",
    "check_batch_divides",
    "load_config",
    "validate",
]
