"""The candidate pool: named architectures, each a backbone plus overrides of model.<backbone>.

A candidate is written as one string, so that a pool is an ordinary config tuple and can be
replaced on the command line:

    "name:backbone"                                   the backbone's configured setting
    "name:backbone:key=value[:key=value...]"          with keys of model.<backbone> overridden

A key may carry its section ("dcn.hidden" or "hidden"); a value is a Python literal
(`(512, 256)`, `3`, `True`, `'stacked'`). The candidate named exactly like its backbone with no
override is that backbone's *base* setting: the paper's Table 3 is the view of the pool on the
five base candidates. `evaluate.models` names the candidates to run (() = the whole pool), so
`--config.evaluate.models="('dcn','wukong')"` runs those two base settings only.

    --config.evaluate.candidates="('dcn:dcn', 'dcn_deep:dcn:dcn.hidden=(512,256,128)')"
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any, NamedTuple

import jax
import numpy as np

from diet_jax.models.factory import BACKBONES, RecModel, build_model


class Candidate(NamedTuple):
    name: str
    backbone: str
    overrides: tuple  # ((key, value), ...) of model.<backbone>

    @property
    def is_base(self) -> bool:
        return self.name == self.backbone and not self.overrides


# Three or more settings per backbone that a researcher would compare (depth, width, cross
# layers, experts, structure); variants lean small so that the pool stays affordable on a CPU.
DEFAULT_POOL = (
    # The five base settings first (the Table 3 view), then the variants backbone by backbone
    # in turn, so that a partial run already spans every backbone.
    "dcn:dcn",
    "dcnv2:dcnv2",
    "finalnet:finalnet",
    "finalmlp:finalmlp",
    "wukong:wukong",
    "dcn_narrow:dcn:hidden=(64,32)",
    "dcnv2_small:dcnv2:parallel_hidden=(128,64):num_cross_layers=2",
    "finalnet_1b:finalnet:block_type='1B'",
    "finalmlp_small:finalmlp:mlp1_hidden=(128,64):mlp2_hidden=(128,64)",
    "wukong_small:wukong:lcb_features=8:fmb_features=8:fmb_hidden=(64,)",
    "dcn_deep:dcn:hidden=(256,128,64):num_cross_layers=4",
    "dcnv2_crossnet:dcnv2:structure='crossnet_only'",
    "finalnet_relu:finalnet:act='relu'",
    "finalmlp_small_nofs:finalmlp:mlp1_hidden=(128,64):mlp2_hidden=(128,64):use_fs=False",
    "wukong_mid:wukong:lcb_features=16:fmb_features=16:fmb_hidden=(128,64):top_hidden=(128,64)",
)
TINY_POOL = ("dcn:dcn", "dcn_narrow:dcn:hidden=(8,)", "wukong:wukong")


def parse(spec: str) -> Candidate:
    """'name:backbone[:key=value...]' -> Candidate. Keys are not checked here (see `check`)."""
    if not isinstance(spec, str):
        raise ValueError(f"A candidate is a string 'name:backbone[:key=value...]', got {spec!r}.")
    parts = spec.split(":")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ValueError(f"Candidate {spec!r} must read 'name:backbone[:key=value...]'.")
    name, backbone, overrides = parts[0].strip(), parts[1].strip(), []
    if backbone not in BACKBONES:
        raise ValueError(
            f"Candidate {spec!r}: unknown backbone {backbone!r}; available: {', '.join(BACKBONES)}."
        )
    for item in parts[2:]:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"Candidate {spec!r}: override {item!r} must read key=value.")
        if key.startswith(backbone + "."):
            key = key[len(backbone) + 1 :]
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            raise ValueError(
                f"Candidate {spec!r}: value {text!r} of {key!r} is not a Python literal."
            ) from None
        overrides.append((key, value))
    return Candidate(name, backbone, tuple(overrides))


def _coerce(spec: str, key: str, default: Any, value: Any) -> Any:
    """`value` in the type of the configured default, or a ValueError naming the key."""
    bad = ValueError(
        f"Candidate {spec!r}: {key}={value!r} must be of the type of its default {default!r}."
    )
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad
        return value
    if isinstance(default, tuple | list):
        if isinstance(value, int) and not isinstance(value, bool):
            value = (value,)
        if not isinstance(value, tuple | list):
            raise bad
        return tuple(value)
    raise bad


def model_config(model_cfg, cand: Candidate):
    """A copy of config.model with the candidate's overrides in model.<backbone>."""
    cfg = model_cfg.copy_and_resolve_references()
    section = cfg[cand.backbone]
    spec = f"{cand.name}:{cand.backbone}"
    for key, value in cand.overrides:
        if key not in section:
            raise ValueError(
                f"Candidate {spec!r}: unknown key {key!r} of model.{cand.backbone}; keys: "
                f"{', '.join(sorted(section.keys()))}."
            )
        section[key] = _coerce(spec, key, section[key], value)
    return cfg


def candidates(config) -> list[Candidate]:
    """The candidates of config.evaluate.candidates named in config.evaluate.models, in pool
    order; all of them when evaluate.models is ()."""
    pool = [parse(spec) for spec in config.evaluate.candidates]
    keep = set(config.evaluate.models)
    return [c for c in pool if not keep or c.name in keep]


def names(config) -> list[str]:
    """The names of every candidate of config.evaluate.candidates, in pool order (a malformed
    candidate is a ValueError naming the key)."""
    try:
        return [parse(spec).name for spec in config.evaluate.candidates]
    except ValueError as e:
        raise ValueError(f"config.evaluate.candidates: {e}") from None


def seeds(config) -> list[int]:
    """The evaluate.seeds seeds of every (method, candidate): config.seed, config.seed + 1, ..."""
    return [int(config.seed) + i for i in range(int(config.evaluate.seeds))]


def build(cand: Candidate, config, feature_map) -> RecModel:
    """The candidate's recommender, named after the candidate."""
    model = build_model(model_config(config.model, cand), feature_map, name=cand.backbone)
    return dataclasses.replace(model, name=cand.name)


def dense_params(config, feature_map) -> dict[str, int]:
    """{candidate: its dense network's parameter count} for the pool of `config`, built
    abstractly (`jax.eval_shape`: no weights are made)."""
    out = {}
    for cand in candidates(config):
        model = build(cand, config, feature_map)
        shapes, _ = jax.eval_shape(lambda m=model: m.init_dense(jax.random.key(0)))
        out[cand.name] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    return out


def check(config) -> None:
    """Rejects a bad pool, seed count or learning-rate grid with a ValueError naming the key."""
    ev = config.evaluate
    names = set()
    for spec in ev.candidates:
        try:
            cand = parse(spec)
            model_config(config.model, cand)
        except ValueError as e:
            raise ValueError(f"config.evaluate.candidates: {e}") from None
        if cand.name in names:
            raise ValueError(f"config.evaluate.candidates: candidate name {cand.name!r} repeats.")
        names.add(cand.name)
    unknown = sorted(set(ev.models) - names)
    if unknown:
        raise ValueError(
            f"config.evaluate.models: unknown candidate(s) {unknown}; the pool "
            f"(evaluate.candidates) has {', '.join(sorted(names))}."
        )
    if int(ev.seeds) < 1:
        raise ValueError(f"config.evaluate.seeds must be at least 1, got {ev.seeds}.")
    for key in ("lr_grid", "reference_lr_grid"):
        rates = tuple(ev[key])
        if any(not (isinstance(lr, int | float) and lr > 0) for lr in rates):
            raise ValueError(f"config.evaluate.{key} must hold positive numbers, got {rates}.")
    grid = tuple(ev.lr_grid)
    if not grid and not ev.learning_rate > 0:
        raise ValueError(f"config.evaluate.learning_rate must be positive, got {ev.learning_rate}.")
    if int(ev.max_epochs) < 1:
        raise ValueError(f"config.evaluate.max_epochs must be at least 1, got {ev.max_epochs}.")
    if int(ev.val_rows) < 0:
        raise ValueError(f"config.evaluate.val_rows must be >= 0 (0 = all), got {ev.val_rows}.")
    if ev.finetune_lr not in ("train", "rows"):
        try:
            ok = float(ev.finetune_lr) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                "config.evaluate.finetune_lr must be 'train', 'rows' or a positive rate, got "
                f"{ev.finetune_lr!r}."
            )
    for key, allowed in (
        ("finetune_adam", ("fresh", "rows")),
        ("lr_select", ("rows", "final")),
    ):
        if ev[key] not in allowed:
            raise ValueError(f"config.evaluate.{key} must be one of {allowed}, got {ev[key]!r}.")
    if ev.finetune_adam == "rows" and config.train.embedding_optimizer == "dense_adam":
        raise ValueError(
            "config.evaluate.finetune_adam='rows' needs a row-sparse train.embedding_optimizer "
            "(the fine-tune's dense Adam state apart from the table's), not dense_adam."
        )
    top = ev.get("lr_select_top", 0)
    if not isinstance(top, int) or isinstance(top, bool) or top < 0:
        raise ValueError(
            f"config.evaluate.lr_select_top must be an integer >= 0 (0 = every rate), got {top!r}."
        )
    prune_at = int(ev.get("lr_prune_epochs", 0))
    if prune_at > 0:
        if prune_at >= int(ev.max_epochs):
            raise ValueError(
                f"config.evaluate.lr_prune_epochs ({prune_at}) must be below "
                f"evaluate.max_epochs ({ev.max_epochs}) (0 = no pruning)."
            )
        # The rates evaluate.lr_select compares after the rows epochs (lr_select_top 0: all).
        compared = (top or len(grid)) if ev.lr_select == "final" else 1
        if int(ev.lr_prune_keep) < compared:
            raise ValueError(
                f"config.evaluate.lr_prune_keep ({ev.lr_prune_keep}) must keep at least the "
                f"{compared} rate(s) that evaluate.lr_select compares after the rows epochs "
                "(evaluate.lr_select_top; 0 there means every rate, so no pruning)."
            )
    if ev.group_mode not in ("auto", "vmap", "sequential"):
        raise ValueError(
            f"config.evaluate.group_mode must be auto, vmap or sequential, got {ev.group_mode!r}."
        )
    if int(ev.bootstrap) < 0:
        raise ValueError(f"config.evaluate.bootstrap must be >= 0, got {ev.bootstrap}.")
