"""diet_jax: streaming dataset distillation (DIET) for multi-task recommenders, in JAX."""

__version__ = "0.1.0"
