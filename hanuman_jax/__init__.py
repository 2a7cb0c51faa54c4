"""hanuman_jax: a JAX/Flax trainer for Thai/English Mixture-of-Experts language models."""

__version__ = "0.1.0"
