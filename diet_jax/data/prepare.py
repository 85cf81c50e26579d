"""Builds (or finds) the stage store for a config."""

from __future__ import annotations

import os

from absl import logging

from diet_jax.data import kuairand, movielens, synthetic, synthetic_taobao, taobao, tmall
from diet_jax.data.store import StageStore

SOURCES = ("synthetic", "taobao", "tmall", "kuairand", "movielens", "taobao_synth")
# Real-data readers: each raises FileNotFoundError naming the missing raw file, where to get it
# and where to put it.
_READERS = {
    "taobao": taobao.build,
    "tmall": tmall.build,
    "kuairand": kuairand.build,
    "movielens": movielens.build,
    "taobao_synth": synthetic_taobao.build,  # generates UserBehavior.csv, then the real reader
}


def store_root(config, workdir: str) -> str:
    return config.data.store_dir or os.path.join(workdir, "data")


def prepare(config, workdir: str) -> StageStore:
    """Returns the stage store of `config.data`, writing it first if it does not exist yet."""
    root = store_root(config, workdir)
    if StageStore.exists(root):
        logging.info("data: using the stage store at %s", root)
        return StageStore(root)
    source = config.data.source
    if source == "synthetic":
        synthetic.generate(config.data, root, progress=config.progress)
    elif source in _READERS:
        _READERS[source](config.data, root, progress=config.progress)
    else:
        raise ValueError(f"Unsupported data source: {source!r}; available: {', '.join(SOURCES)}.")
    return StageStore(root)
