"""diet_jax: streaming dataset distillation (DIET) for multi-task recommenders, in JAX.

The stable API (docs/library.md), imported on first use so that `import diet_jax` stays cheap:

    evaluate_candidate(workdir, module, method="diet")   train and test your model on a run
    load_distilled(workdir)                              <workdir>/distilled.npz as arrays
    build_model, from_module, load_module, RecModel     models (zoo backbones, your modules)
    influence, el2n, grad_sum, grad_dot, deficiency, responsibility, ...   influence toolkit
    phase1, boundary_memory                              DIET phase 1
    bilevel, make_outer_step, BilevelConfig, ...         DIET phase 2's outer step
    protocol, run_candidate                              the candidate protocol
    fidelity, fidelity_table, spearman, kendall          fidelity to full-data training
    noise_ceiling, seed_agreement, faithful_tau          how far a rank correlation can go
    pipeline, run                                        the whole pipeline for one config
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute); attribute None: the module itself.
_API = {
    # the library entry points
    "evaluate_candidate": ("diet_jax.candidate", "evaluate_candidate"),
    "config_from_workdir": ("diet_jax.candidate", "config_from_workdir"),
    "load_config": ("diet_jax.candidate", "load_config"),
    "load_distilled": ("diet_jax.distill.export", "load"),
    "Distilled": ("diet_jax.distill.export", "Distilled"),
    # models
    "build_model": ("diet_jax.models.factory", "build_model"),
    "build_backbone": ("diet_jax.models.factory", "build_backbone"),
    "from_module": ("diet_jax.models.factory", "from_module"),
    "load_module": ("diet_jax.models.factory", "load_module"),
    "RecModel": ("diet_jax.models.factory", "RecModel"),
    "BACKBONES": ("diet_jax.models.factory", "BACKBONES"),
    # influence
    "influence": ("diet_jax.influence", None),
    "el2n": ("diet_jax.influence", "el2n"),
    "dense_loss": ("diet_jax.influence", "dense_loss"),
    "per_sample_grads": ("diet_jax.influence", "per_sample_grads"),
    "grad_sum": ("diet_jax.influence", "grad_sum"),
    "grad_dot": ("diet_jax.influence", "grad_dot"),
    "pairwise": ("diet_jax.influence", "pairwise"),
    "deficiency": ("diet_jax.influence", "deficiency"),
    "responsibility": ("diet_jax.influence", "responsibility"),
    # DIET phase 1 and phase 2
    "phase1": ("diet_jax.distill.phase1", None),
    "boundary_memory": ("diet_jax.distill.phase1", "boundary_memory"),
    "bilevel": ("diet_jax.distill.bilevel", None),
    "BilevelConfig": ("diet_jax.distill.bilevel", "BilevelConfig"),
    "DistillState": ("diet_jax.distill.bilevel", "DistillState"),
    "make_outer_step": ("diet_jax.distill.bilevel", "make_outer_step"),
    "make_meta_optimizer": ("diet_jax.distill.bilevel", "make_meta_optimizer"),
    "init_state": ("diet_jax.distill.bilevel", "init_state"),
    "stage_context": ("diet_jax.distill.bilevel", "stage_context"),
    "Memory": ("diet_jax.distill.memory", "Memory"),
    # evaluation
    "protocol": ("diet_jax.evaluate.protocol", None),
    "run_candidate": ("diet_jax.evaluate.protocol", "run_candidate"),
    "CandidateResult": ("diet_jax.evaluate.protocol", "CandidateResult"),
    "fidelity": ("diet_jax.evaluate.fidelity", None),
    "fidelity_table": ("diet_jax.evaluate.fidelity", "fidelity_table"),
    "spearman": ("diet_jax.evaluate.fidelity", "spearman"),
    "kendall": ("diet_jax.evaluate.fidelity", "kendall"),
    "noise_ceiling": ("diet_jax.evaluate.fidelity", "noise_ceiling"),
    "seed_agreement": ("diet_jax.evaluate.fidelity", "seed_agreement"),
    "faithful_tau": ("diet_jax.evaluate.fidelity", "faithful_tau"),
    # the pipeline
    "pipeline": ("diet_jax.pipeline", None),
    "run": ("diet_jax.pipeline", "run"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'diet_jax' has no attribute {name!r}")
    module, attr = _API[name]
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
