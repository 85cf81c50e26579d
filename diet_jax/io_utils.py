"""Small file helpers: atomic writes and JSON lines."""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any


def atomic_write_text(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename, so readers never see half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path: str, obj: Any) -> None:
    """Strict JSON (RFC 8259): a NaN or infinite float is written as null (`finite_or_null`),
    so parsers other than Python's (jq, JavaScript, Go) read every file the project writes."""
    atomic_write_text(path, dumps(obj, indent=2) + "\n")


def dumps(obj: Any, indent: int | None = None) -> str:
    """json.dumps of `obj` with numpy values as Python ones and non-finite floats as null."""
    return json.dumps(finite_or_null(obj), indent=indent, sort_keys=False, allow_nan=False)


def finite_or_null(x: Any) -> Any:
    """`x` with numpy scalars and arrays as Python values and NaN / +-inf as None, recursively."""
    if isinstance(x, dict):
        return {k: finite_or_null(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_null(v) for v in x]
    if hasattr(x, "tolist"):  # a numpy (or JAX) array or scalar
        return finite_or_null(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


class MetricsWriter:
    """Appends one JSON object per call to `<workdir>/metrics.jsonl`; only process 0 writes."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled
        self.tensorboard = None  # the same records as TensorBoard scalars (metric_writers.py)
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            _drop_partial_line(self.path)
            from diet_jax import metric_writers

            self.tensorboard = metric_writers.create(workdir)

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(dumps(record) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(record)


def _drop_partial_line(path: str) -> None:
    """Cuts a last line that a killed run left unfinished, so that every line parses."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            pos = size - 1
            while pos > 0:  # back to the last newline
                step = min(pos, 1 << 16)
                f.seek(pos - step)
                chunk = f.read(step)
                nl = chunk.rfind(b"\n")
                if nl >= 0:
                    f.truncate(pos - step + nl + 1)
                    return
                pos -= step
            f.truncate(0)
    except FileNotFoundError:
        pass


def enable_compilation_cache() -> str:
    """Caches every compiled program on disk ($DIET_JAX_CACHE, default ~/.cache/diet_jax_jax_cache),
    so a rerun or a resumed run compiles (almost) nothing. Every program, however small: JAX
    keeps only those that took over a second to compile by default, and a candidate's many
    small ones (inits, copies, the eager ops of a new architecture) cost the default run about
    two minutes on every run. Returns the folder."""
    import jax  # here, so that io_utils stays importable without initialising JAX

    cache = os.environ.get("DIET_JAX_CACHE", os.path.expanduser("~/.cache/diet_jax_jax_cache"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache
