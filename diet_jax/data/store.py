"""The stage store: every stage written once as columnar arrays, read back memory-mapped.

Layout under `root`:

    feature_map.json            fields, vocabulary sizes, tasks, stages (written last)
    stages/<name>/x.npy         int32 [rows, F] feature ids, local to each field
    stages/<name>/y.npy         uint8 [rows, K] binary labels
    stages/<name>/<extra>.npy   optional extra columns (the synthetic stream's true probabilities)

A store is built in `<root>.tmp-<pid>` and renamed to `root` only when complete, so an
interrupted preparation never leaves a half-written store where a reader would find it. The
pipeline stamps a finished store (`<root>.stamp.json`: its fingerprint and file sizes, see
`checkpoint.py`); `StageStore.fingerprint` reads it back (None for an unstamped store).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
from typing import Any

import numpy as np

from diet_jax.io_utils import atomic_write_json, read_json

ROLES = ("historical", "subsequent", "validation", "test")
FEATURE_MAP = "feature_map.json"


@dataclasses.dataclass(frozen=True)
class StageInfo:
    name: str
    role: str
    rows: int


@dataclasses.dataclass(frozen=True)
class FeatureMap:
    """What a model needs to know about the data, and where the stages are."""

    dataset: str
    fields: tuple[str, ...]
    vocab_sizes: tuple[int, ...]
    tasks: tuple[str, ...]
    stages: tuple[StageInfo, ...]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_fields(self) -> int:
        return len(self.fields)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def stages_with_role(self, role: str) -> list[StageInfo]:
        if role not in ROLES:
            raise ValueError(f"Unknown stage role {role!r}; expected one of {ROLES}.")
        return [s for s in self.stages if s.role == role]

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["fields"], d["vocab_sizes"], d["tasks"] = (
            list(self.fields),
            list(self.vocab_sizes),
            list(self.tasks),
        )
        return d

    @classmethod
    def from_json(cls, d: dict) -> FeatureMap:
        return cls(
            dataset=d["dataset"],
            fields=tuple(d["fields"]),
            vocab_sizes=tuple(int(v) for v in d["vocab_sizes"]),
            tasks=tuple(d["tasks"]),
            stages=tuple(StageInfo(**s) for s in d["stages"]),
            extra=d.get("extra", {}),
        )


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage's arrays (memory-mapped when read from disk)."""

    info: StageInfo
    x_NxF: np.ndarray
    y_NxK: np.ndarray
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.info.name

    def __len__(self) -> int:
        return int(self.x_NxF.shape[0])


class StageStore:
    """Read access to a finished store."""

    def __init__(self, root: str):
        path = os.path.join(root, FEATURE_MAP)
        if not os.path.exists(path):
            raise FileNotFoundError(f"No stage store at {root!r}: {FEATURE_MAP} is missing.")
        self.root = root
        try:
            self.feature_map = FeatureMap.from_json(read_json(path))
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptStoreError(f"The stage store's {path} cannot be read: {e}.") from e
        self.fingerprint = _stamped_fingerprint(root)

    @staticmethod
    def exists(root: str) -> bool:
        return os.path.exists(os.path.join(root, FEATURE_MAP))

    def stage(self, name: str) -> Stage:
        infos = {s.name: s for s in self.feature_map.stages}
        if name not in infos:
            raise KeyError(f"No stage {name!r} in {self.root}; stages are {sorted(infos)}.")
        d = os.path.join(self.root, "stages", name)
        extra = {
            f[:-4]: _load_column(os.path.join(d, f), infos[name].rows)
            for f in sorted(os.listdir(d))
            if f.endswith(".npy") and f not in ("x.npy", "y.npy")
        }
        return Stage(
            info=infos[name],
            x_NxF=_load_column(os.path.join(d, "x.npy"), infos[name].rows),
            y_NxK=_load_column(os.path.join(d, "y.npy"), infos[name].rows),
            extra=extra,
        )

    def stages(self, role: str) -> list[Stage]:
        return [self.stage(s.name) for s in self.feature_map.stages_with_role(role)]


class CorruptStoreError(ValueError):
    """A store file that is missing, truncated or unreadable (named in the message)."""


def _load_column(path: str, rows: int) -> np.ndarray:
    """A memory-mapped column, checked against the feature map's row count."""
    try:
        a = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:  # missing, truncated (mmap past the end), bad header
        raise CorruptStoreError(f"Stage store file {path} is damaged or missing: {e}.") from e
    if a.shape[0] != rows:
        raise CorruptStoreError(f"Stage store file {path} has {a.shape[0]} rows, {rows} expected.")
    return a


def _stamped_fingerprint(root: str) -> str | None:
    try:
        return read_json(os.path.abspath(root).rstrip(os.sep) + ".stamp.json").get("fingerprint")
    except (OSError, ValueError):
        return None


class StoreWriter:
    """Builds a store in a temporary folder; `finish()` validates it and renames it into place.

    Use as a context manager: leaving the block through an exception removes the temporary folder.
    """

    def __init__(self, root: str, dataset: str, fields, vocab_sizes, tasks):
        self.root = os.path.abspath(root)
        self.tmp = f"{self.root}.tmp-{os.getpid()}"
        self.dataset = dataset
        self.fields, self.vocab_sizes, self.tasks = (
            tuple(fields),
            tuple(int(v) for v in vocab_sizes),
            tuple(tasks),
        )
        self._stages: list[StageInfo] = []
        self.extra: dict[str, Any] = {}

    def __enter__(self) -> StoreWriter:
        _remove_stale_tmp(self.root)
        if os.path.exists(self.tmp):
            shutil.rmtree(self.tmp)
        os.makedirs(os.path.join(self.tmp, "stages"))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and os.path.exists(self.tmp):
            shutil.rmtree(self.tmp)

    def new_stage(self, name: str, role: str, rows: int, extra_columns: dict | None = None) -> dict:
        """Allocates a stage's arrays on disk; returns writable memmaps keyed `x`, `y` and extras.

        `extra_columns` maps a name to (dtype, width).
        """
        if role not in ROLES:
            raise ValueError(f"Unknown stage role {role!r}; expected one of {ROLES}.")
        if any(s.name == name for s in self._stages):
            raise ValueError(f"Stage {name!r} written twice.")
        d = os.path.join(self.tmp, "stages", name)
        os.makedirs(d)
        shapes = {"x": (np.int32, len(self.fields)), "y": (np.uint8, len(self.tasks))}
        shapes.update(extra_columns or {})
        arrays = {}
        for key, (dtype, width) in shapes.items():
            path = os.path.join(d, f"{key}.npy")
            arrays[key] = np.lib.format.open_memmap(
                path, mode="w+", dtype=dtype, shape=(rows, width)
            )
            _reserve(path)
        self._stages.append(StageInfo(name=name, role=role, rows=int(rows)))
        return arrays

    def finish(self) -> FeatureMap:
        fmap = FeatureMap(
            dataset=self.dataset,
            fields=self.fields,
            vocab_sizes=self.vocab_sizes,
            tasks=self.tasks,
            stages=tuple(self._stages),
            extra=self.extra,
        )
        _validate(self.tmp, fmap)
        atomic_write_json(os.path.join(self.tmp, FEATURE_MAP), fmap.to_json())
        if os.path.exists(self.root):
            shutil.rmtree(self.root)
        os.replace(self.tmp, self.root)
        return fmap


def _reserve(path: str) -> None:
    """Allocates a memmap's file on disk now: on a full disk, writes through the map would
    kill the process with SIGBUS; here they raise ENOSPC naming the file."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.path.getsize(path))
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without fallocate
            raise OSError(e.errno, os.strerror(e.errno), path) from e
    finally:
        os.close(fd)


def _remove_stale_tmp(root: str) -> None:
    """Temporary stores of preparations that were killed (their pid is gone)."""
    parent, base = os.path.split(root)
    if not os.path.isdir(parent):
        return
    for d in os.listdir(parent):
        pid = d[len(base) + 5 :] if d.startswith(base + ".tmp-") else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(parent, d), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _validate(root: str, fmap: FeatureMap) -> None:
    """Checks every id is inside its field's vocabulary and every label is 0 or 1."""
    vocab_F = np.asarray(fmap.vocab_sizes, dtype=np.int64)
    for info in fmap.stages:
        d = os.path.join(root, "stages", info.name)
        x = np.load(os.path.join(d, "x.npy"), mmap_mode="r")
        y = np.load(os.path.join(d, "y.npy"), mmap_mode="r")
        for start in range(0, info.rows, 1 << 20):
            xs = np.asarray(x[start : start + (1 << 20)])
            bad = (xs < 0) | (xs >= vocab_F)
            if bad.any():
                r, f = np.argwhere(bad)[0]
                raise ValueError(
                    f"Stage {info.name!r} row {start + r}: id {xs[r, f]} of field "
                    f"{fmap.fields[f]!r} is outside its vocabulary [0, {vocab_F[f]})."
                )
            if (np.asarray(y[start : start + (1 << 20)]) > 1).any():
                raise ValueError(f"Stage {info.name!r}: labels must be 0 or 1.")
