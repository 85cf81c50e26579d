"""Shared test setup: a persistent compilation cache, strict numerics, one tiny config."""

import os
import sys

import jax

# Four simulated CPU devices are available to tests that shard; everything else uses device 0.
jax.config.update("jax_num_cpu_devices", 4)
# Test shapes are tiny, so compilation dominates: trade XLA's optimisations for compile time.
# The environment variable carries the setting into the subprocesses some tests start.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
jax.config.update("jax_disable_most_optimizations", True)

from diet_jax import io_utils  # noqa: E402

io_utils.enable_compilation_cache()  # main's cache: $DIET_JAX_CACHE, every program kept

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def load_config(name: str = "synthetic", arg: str | None = "tiny"):
    """configs/<name>.py's get_config(arg); configs/ is a folder of files, not a package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"config_{name}", os.path.join(ROOT, "configs", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture
def tiny_config():
    return load_config("synthetic", "tiny")


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """The tiny synthetic stream, generated once per test session."""
    from diet_jax.data import synthetic
    from diet_jax.data.store import StageStore

    root = str(tmp_path_factory.mktemp("store") / "data")
    synthetic.generate(load_config("synthetic", "tiny").data, root, progress=False)
    return StageStore(root)


# The config keys that the shared tiny run read (tests/test_config.py checks that none is unused).
TINY_RUN_READS: set[str] = set()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One full `pipeline.run` of the tiny config, shared by the tests that read its artifacts."""
    from diet_jax import config_check, pipeline

    workdir = str(tmp_path_factory.mktemp("run"))
    config = load_config("synthetic", "tiny")
    with config_check.track_reads(config) as reads:
        res = pipeline.run(config, workdir)
    TINY_RUN_READS.update(reads)
    return workdir, res
