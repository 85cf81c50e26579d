"""Models: a multi-field embedding, backbones, the shared MMoE head, and a factory by name."""

from diet_jax.models.factory import BACKBONES, RecModel, build_backbone, build_model

__all__ = ["BACKBONES", "RecModel", "build_backbone", "build_model"]
