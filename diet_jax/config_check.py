"""Checks every name and range of a config before any work starts.

`validate(config)` runs each function in `CHECKS`; a bad value raises `ConfigError` (a
ValueError) naming the key, so `python -m diet_jax.main` prints one line and exits with status 2
before data preparation, training or distillation. A module that owns config keys adds its own
check as one line in `CHECKS`: a function of the config that raises ValueError naming the key
(for example `lambda c: driver.check_config(c.distill)`); `validate` turns its ValueError into
a ConfigError.

What cannot be known from the config alone is checked where it becomes known: the device count
(parallel.mesh_from_config), the raw files (the readers in data/), the field count of a real
dataset (the models).
"""

from __future__ import annotations

import contextlib
import inspect
import re
import sys
from collections.abc import Callable, Iterator

import ml_collections

from diet_jax import results
from diet_jax.data import prepare, raw, synthetic, tmall
from diet_jax.distill import driver
from diet_jax.errors import ConfigError, one_line
from diet_jax.evaluate import pool
from diet_jax.models import BACKBONES, dcnv2, factory, finalnet, layers
from diet_jax.train import steps
from diet_jax.train.sparse import EMBEDDING_OPTIMIZERS

OPTIMIZERS = ("adam", "sgd")  # train/optim.py's make_optimizer
RAW_FILE_SOURCES = ("taobao", "tmall", "kuairand", "movielens")  # data/prepare.py's readers


# ------------------------------------------------------------------ helpers


def is_tiny(arg: str | None, config_file: str) -> bool:
    """A config file's variant: `file.py` (None) or `file.py:tiny`; anything else is an error."""
    if arg in (None, "", "default", "tiny"):
        return arg == "tiny"
    raise ConfigError(f"Unknown variant {arg!r} of {config_file}; use ':tiny' or nothing.")


def _value(config, path: str):
    node = config
    for part in path.split("."):
        if part not in node:
            raise ConfigError(f"config.{path} is missing (no key {part!r}).")
        node = node[part]
    return node


def positive(config, *paths: str) -> None:
    for p in paths:
        v = _value(config, p)
        if not v > 0:
            raise ConfigError(f"config.{p} must be positive, got {v}.")


def non_negative(config, *paths: str) -> None:
    for p in paths:
        v = _value(config, p)
        if not v >= 0:
            raise ConfigError(f"config.{p} must be non-negative, got {v}.")


def in_range(
    config, path: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> None:
    v = _value(config, path)
    if not ((lo < v) if lo_open else (lo <= v)) or not ((v < hi) if hi_open else (v <= hi)):
        raise ConfigError(
            f"config.{path} must lie in {'(' if lo_open else '['}{lo}, {hi}"
            f"{')' if hi_open else ']'}, got {v}."
        )


def one_of(config, path: str, allowed) -> None:
    v = _value(config, path)
    if v not in allowed:
        raise ConfigError(f"config.{path} must be one of {tuple(allowed)}, got {v!r}.")


def names_in(config, path: str, allowed) -> None:
    """A tuple of names: each known, none twice."""
    v = tuple(_value(config, path))
    unknown = [n for n in v if n not in allowed]
    if unknown:
        raise ConfigError(
            f"config.{path} has unknown name(s) {unknown}; available: {', '.join(allowed)}."
        )
    if len(set(v)) != len(v):
        raise ConfigError(f"config.{path} repeats a name: {v}.")


def widths(config, path: str, *, allow_empty: bool = True) -> None:
    """A tuple of layer widths: positive integers."""
    v = tuple(_value(config, path))
    if not allow_empty and not v:
        raise ConfigError(f"config.{path} needs at least one layer, got ().")
    if not all(isinstance(w, int) and w > 0 for w in v):
        raise ConfigError(f"config.{path} must hold positive layer widths, got {v}.")


# ------------------------------------------------------------------ sections


def check_top(c) -> None:
    in_range(c, "ratio", 0, 1, lo_open=True)
    non_negative(c, "seed")


def check_model(c) -> None:
    positive(c, "model.embed_dim", "model.mmoe.num_experts")
    for p in ("mmoe.expert_hidden", "mmoe.gate_hidden", "mmoe.tower_hidden"):
        widths(c, f"model.{p}")
    positive(c, "model.dcn.num_cross_layers")
    widths(c, "model.dcn.hidden")
    one_of(c, "model.dcnv2.structure", dcnv2.STRUCTURES)
    positive(c, "model.dcnv2.num_cross_layers", "model.dcnv2.low_rank", "model.dcnv2.num_experts")
    widths(c, "model.dcnv2.stacked_hidden")
    widths(c, "model.dcnv2.parallel_hidden")
    one_of(c, "model.finalnet.block_type", finalnet.BLOCK_TYPES)
    one_of(c, "model.finalnet.residual_type", finalnet.RESIDUAL_TYPES)
    one_of(c, "model.finalnet.act", tuple(layers.ACTIVATIONS))
    for p in ("block1_hidden", "block2_hidden"):
        widths(c, f"model.finalnet.{p}", allow_empty=False)
        odd = [w for w in c.model.finalnet[p] if w % 2]
        if c.model.finalnet.residual_type == "concat" and odd:
            raise ConfigError(
                f"config.model.finalnet.{p} must hold even widths with residual_type 'concat', "
                f"got {tuple(c.model.finalnet[p])}."
            )
    fm = c.model.finalmlp
    for p in ("mlp1_hidden", "mlp2_hidden"):
        widths(c, f"model.finalmlp.{p}", allow_empty=False)
        if fm[p][-1] % fm.num_heads:
            raise ConfigError(
                f"config.model.finalmlp.{p}[-1] ({fm[p][-1]}) must be divisible by "
                f"model.finalmlp.num_heads ({fm.num_heads})."
            )
    widths(c, "model.finalmlp.fs_hidden")
    positive(c, "model.finalmlp.num_heads", "model.finalmlp.fusion_dim")
    for p in ("fs1_context", "fs2_context"):
        if not all(isinstance(i, int) and i >= 0 for i in fm[p]):
            raise ConfigError(f"config.model.finalmlp.{p} must hold field indices, got {fm[p]}.")
    positive(c, "model.wukong.num_layers", "model.wukong.lcb_features", "model.wukong.fmb_features")
    non_negative(c, "model.wukong.rank_k")
    widths(c, "model.wukong.fmb_hidden")
    widths(c, "model.wukong.top_hidden", allow_empty=False)


def check_teacher(c) -> None:
    one_of(c, "teacher.model", BACKBONES)
    one_of(c, "model.name", BACKBONES)


def check_train(c) -> None:
    one_of(c, "train.optimizer", OPTIMIZERS)
    one_of(c, "train.embedding_optimizer", EMBEDDING_OPTIMIZERS)
    positive(c, "train.learning_rate", "train.adagrad_learning_rate")
    positive(c, "train.batch_size", "train.eval_batch_size", "train.log_every")
    non_negative(c, "train.max_grad_norm")
    steps.check_nan_policy(c.train)


def check_distill(c) -> None:
    driver.check_config(c.distill)
    factory.check_proxy_config(c.distill)  # a user module as the distillation proxy
    non_negative(
        c,
        "distill.max_grad_norm",
        "distill.active_size",
        "distill.batch_size",
        "distill.address_pool",
        "distill.checkpoint_every",
    )
    positive(c, "distill.chunk_size")
    in_range(c, "distill.label_mix", 0, 1, hi_open=True)


def check_evaluate(c) -> None:
    names_in(c, "evaluate.methods", results.CANDIDATE_METHODS)
    # evaluate.models names candidates of the pool (a variant as well as a base backbone)
    names_in(c, "evaluate.models", pool.names(c))
    positive(
        c,
        "evaluate.max_epochs",
        "evaluate.learning_rate",
        "evaluate.rows_batch_size",
        "evaluate.kmeans_clusters",
        "evaluate.kmeans_iters",
        "evaluate.kmeans_max_rows",
    )
    non_negative(c, "evaluate.lr_prune_epochs", "evaluate.lr_prune_keep")
    in_range(c, "evaluate.el2n_percentile", 0, 1)
    in_range(c, "evaluate.selection_label_mix", 0, 1, hi_open=True)
    pool.check(c)  # the candidate pool: backbones, override keys, seeds, LR grid


def check_parallel(c) -> None:
    non_negative(c, "parallel.data_axis_size", "parallel.num_processes")
    pc = c.parallel
    if pc.process_id < -1:
        raise ConfigError(
            f"config.parallel.process_id must be -1 (auto) or >= 0, got {pc.process_id}."
        )
    if pc.num_processes > 0 and pc.process_id >= pc.num_processes:
        raise ConfigError(
            f"config.parallel.process_id ({pc.process_id}) must be below num_processes "
            f"({pc.num_processes})."
        )
    if pc.coordinator_address and not re.fullmatch(r"\S+:\d+", pc.coordinator_address):
        raise ConfigError(
            f"config.parallel.coordinator_address must be 'host:port' or '', got "
            f"{pc.coordinator_address!r}."
        )


def check_data(c) -> None:
    """The data section of each source: the keys its generator or reader reads."""
    one_of(c, "data.source", prepare.SOURCES)
    d = c.data
    if d.source == "synthetic":
        synthetic._check_config(d)  # the generator's own check (data/synthetic.py)
    if d.source not in RAW_FILE_SOURCES:
        return  # a generator: its own check is one more line of CHECKS
    if not d.data_dir:
        raise ConfigError("config.data.data_dir must name the folder holding the raw files.")
    positive(c, "data.chunk_bytes", "data.min_count")
    if "partition_bytes" in d:
        positive(c, "data.partition_bytes")
    if "utc_offset_hours" in d:
        in_range(c, "data.utc_offset_hours", -14, 14)
    if d.source == "tmall":
        tmall.stage_spans(d)  # parses the stages and checks them against data.year
    else:
        raw.parse_stages(d.stages)
    if d.source == "movielens" and not re.fullmatch(r"[0-9a-f]{64}", d.wheel_sha256):
        raise ConfigError(
            f"config.data.wheel_sha256 must be 64 hex digits, got {d.wheel_sha256!r}."
        )


# One line per module that owns config keys; each raises ValueError naming the key.
CHECKS: tuple[Callable, ...] = (
    check_top,
    check_model,
    check_teacher,
    check_train,
    check_distill,
    check_evaluate,
    check_parallel,
    check_data,
)


_checking = [0]  # > 0 while validate runs: its reads are not uses (see track_reads)


def validate(config) -> None:
    """Raises ConfigError naming the first bad key of `config`; reads no data, starts no work."""
    _checking[0] += 1
    try:
        for check in CHECKS:
            try:
                check(config)
            except ConfigError:
                raise
            except (ValueError, TypeError) as e:
                raise ConfigError(one_line(e)) from e
            except (KeyError, AttributeError) as e:
                raise ConfigError(f"config is missing a key: {one_line(e)}") from e
    finally:
        _checking[0] -= 1


# ------------------------------------------------------------------ which keys a run reads


def leaves(config, prefix: str = "") -> list[str]:
    """The dotted path of every key of `config` whose value is not a section."""
    out = []
    for key in config.keys():
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            out += leaves(value, f"{prefix}{key}.")
        else:
            out.append(prefix + key)
    return out


@contextlib.contextmanager
def track_reads(config) -> Iterator[set[str]]:
    """Collects the dotted path of every key of `config` that code reads inside the block.

    `config.a.b`, `config["a"]["b"]` and `config.get("b")` count; ConfigDict's own traversals
    (to_dict, to_json, items, repr, ==) do not, since writing config.json touches every key and
    uses none, and neither do the reads of `validate` (checking a key is not using it). Copies
    of `config` are not tracked. Tests use it to find keys that nothing reads.
    """
    prefix_of: dict[int, str] = {}

    def walk(node, prefix):
        prefix_of[id(node)] = prefix
        for key in node.keys():
            if isinstance(node[key], ml_collections.ConfigDict):
                walk(node[key], f"{prefix}{key}.")

    walk(config, "")
    reads: set[str] = set()
    cls = ml_collections.ConfigDict
    original = cls.__getitem__
    own_file = inspect.getsourcefile(cls)
    passthrough = {"__getattr__", "__getitem__", "get"}

    def getitem(self, key):
        value = original(self, key)
        prefix = prefix_of.get(id(self))
        if prefix is not None and not _checking[0] and isinstance(key, str) and "." not in key:
            frame = sys._getframe(1)
            while frame is not None and (
                frame.f_code.co_filename == own_file and frame.f_code.co_name in passthrough
            ):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename != own_file:
                reads.add(prefix + key)
        return value

    cls.__getitem__ = getitem
    try:
        yield reads
    finally:
        cls.__getitem__ = original
