"""The distilled dataset as one file: `<workdir>/distilled.npz` (format in docs/library.md).

Written by the pipeline once distillation is done (through a temporary file and a rename), read
by `load` (`diet_jax.load_distilled`) without JAX, a config or the run's checkpoints. Rows live
in the embedding space of the final teacher's table; the file names that checkpoint and carries
the SHA-256 of the table, so a reader can check that a table it holds is the right one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile

import numpy as np

FORMAT_VERSION = 1
FILENAME = "distilled.npz"

# key -> (dtype kind, ndim): what `load` checks.
_ARRAYS = {
    "e_NxFxD": ("f", 3),
    "logits_NxK": ("f", 2),
    "origin_N": ("i", 1),
    "row_N": ("i", 1),
    "stage_names": ("U", 1),
    "fields": ("U", 1),
    "tasks": ("U", 1),
    "vocab_sizes": ("i", 1),
}
_KIND_NAMES = {"f": "float", "i": "int", "U": "str"}
_SCALARS = (
    "format_version",
    "dataset",
    "ratio",
    "teacher_checkpoint",
    "teacher_stage",
    "teacher_embed_sha256",
)


@dataclasses.dataclass(frozen=True)
class Distilled:
    """A distilled dataset: N rows of (field embeddings, soft labels) and where they came from."""

    e_NxFxD: np.ndarray  # float32 field embeddings, the final teacher's embedding space
    logits_NxK: np.ndarray  # float32 soft labels as logits (targets: sigmoid)
    origin_N: np.ndarray  # int32 historical stage of each row, 1-based into stage_names
    row_N: np.ndarray  # int32 row of the stage it was selected from (-1: unknown)
    stage_names: tuple[str, ...]  # historical stages in time order
    fields: tuple[str, ...]
    tasks: tuple[str, ...]
    vocab_sizes: tuple[int, ...]
    dataset: str
    ratio: float
    teacher_checkpoint: str  # relative to the workdir when inside it
    teacher_stage: int  # T: the stage whose teacher checkpoint the rows belong to
    teacher_embed_sha256: str  # of that checkpoint's embedding table (`table_sha256`)
    format_version: int = FORMAT_VERSION

    def __len__(self) -> int:
        return int(self.e_NxFxD.shape[0])

    @property
    def labels_NxK(self) -> np.ndarray:
        """Soft labels as probabilities, sigmoid(logits)."""
        return 1.0 / (1.0 + np.exp(-self.logits_NxK))

    @property
    def origin_names_N(self) -> np.ndarray:
        """The name of every row's stage of origin."""
        return np.asarray(self.stage_names)[self.origin_N - 1]

    def rows(self) -> dict:
        """{"e", "logits"}: what `protocol.run_candidate` trains a candidate on."""
        return {"e": self.e_NxFxD, "logits": self.logits_NxK}

    def memory(self):
        """As a `distill.memory.Memory` (device arrays)."""
        from diet_jax.distill import memory as memory_lib

        return memory_lib.new(self.e_NxFxD, self.logits_NxK, self.origin_N, self.row_N)


def table_sha256(params_embed) -> str:
    """SHA-256 of an embedding parameter tree's arrays (float32 bytes, in tree order)."""
    import jax

    from diet_jax import parallel

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params_embed):
        h.update(np.ascontiguousarray(parallel.to_host(leaf), np.float32).tobytes())
    return h.hexdigest()


def path_of(workdir_or_file: str) -> str:
    return (
        os.path.join(workdir_or_file, FILENAME)
        if os.path.isdir(workdir_or_file)
        else workdir_or_file
    )


def save(path: str, d: Distilled) -> str:
    """Writes `d` to `path` (.npz) through a temporary file and a rename; returns the path."""
    _validate(d, path)
    arrays = {k: np.asarray(getattr(d, k)) for k in _ARRAYS}
    scalars = {k: np.asarray(getattr(d, k)) for k in _SCALARS}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays, **scalars)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a dataset is for sharing
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load(workdir_or_file: str) -> Distilled:
    """Reads `<workdir>/distilled.npz` (or the file given) and checks its version and shapes."""
    path = path_of(workdir_or_file)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No distilled dataset at {path!r}: the run has not finished distillation, or it "
            "predates the file (rerun `python -m diet_jax.main` on the workdir to write it)."
        )
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # a truncated or foreign file: say which one
        raise ValueError(f"{path}: not a readable .npz file ({e}).") from None
    with z:
        keys = set(z.files)
        if "format_version" not in keys:
            raise ValueError(f"{path}: no 'format_version' key; not a diet_jax distilled file.")
        version = int(z["format_version"])
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{path}: format_version {version}; this diet_jax reads version {FORMAT_VERSION}."
            )
        missing = sorted((set(_ARRAYS) | set(_SCALARS)) - keys)
        if missing:
            raise ValueError(f"{path}: missing keys {missing} (format_version {version}).")
        raw = {k: z[k] for k in (*_ARRAYS, *_SCALARS)}
    for k, (kind, ndim) in _ARRAYS.items():
        a = raw[k]
        if a.dtype.kind != kind or a.ndim != ndim:
            raise ValueError(
                f"{path}: {k} has dtype {a.dtype} and {a.ndim} dimensions; expected "
                f"{_KIND_NAMES[kind]} with {ndim}."
            )
    d = Distilled(
        e_NxFxD=raw["e_NxFxD"].astype(np.float32, copy=False),
        logits_NxK=raw["logits_NxK"].astype(np.float32, copy=False),
        origin_N=raw["origin_N"].astype(np.int32, copy=False),
        row_N=raw["row_N"].astype(np.int32, copy=False),
        stage_names=tuple(str(s) for s in raw["stage_names"]),
        fields=tuple(str(s) for s in raw["fields"]),
        tasks=tuple(str(s) for s in raw["tasks"]),
        vocab_sizes=tuple(int(v) for v in raw["vocab_sizes"]),
        dataset=str(raw["dataset"]),
        ratio=float(raw["ratio"]),
        teacher_checkpoint=str(raw["teacher_checkpoint"]),
        teacher_stage=int(raw["teacher_stage"]),
        teacher_embed_sha256=str(raw["teacher_embed_sha256"]),
        format_version=version,
    )
    _validate(d, path)
    return d


def _validate(d: Distilled, path: str) -> None:
    """Shapes agree with each other and with the field and task names."""
    n = d.e_NxFxD.shape[0] if d.e_NxFxD.ndim == 3 else -1
    checks = [
        (d.e_NxFxD.ndim == 3, f"e_NxFxD must be [N, F, D], got shape {d.e_NxFxD.shape}"),
        (
            d.e_NxFxD.ndim != 3 or d.e_NxFxD.shape[1] == len(d.fields),
            f"e_NxFxD has {d.e_NxFxD.shape[1:2]} fields, the file names {len(d.fields)}",
        ),
        (
            len(d.vocab_sizes) == len(d.fields),
            f"{len(d.vocab_sizes)} vocab_sizes for {len(d.fields)} fields",
        ),
        (
            d.logits_NxK.shape == (n, len(d.tasks)),
            f"logits_NxK has shape {d.logits_NxK.shape}, expected ({n}, {len(d.tasks)}) "
            f"for {n} rows and tasks {list(d.tasks)}",
        ),
        (
            d.origin_N.shape == (n,) and d.row_N.shape == (n,),
            f"origin_N {d.origin_N.shape} and row_N {d.row_N.shape} must be ({n},)",
        ),
        (
            n <= 0 or (d.origin_N.min() >= 1 and d.origin_N.max() <= len(d.stage_names)),
            f"origin_N must lie in 1..{len(d.stage_names)} (the stages {list(d.stage_names)})",
        ),
        (
            1 <= d.teacher_stage <= max(1, len(d.stage_names)),
            f"teacher_stage {d.teacher_stage} is not one of the {len(d.stage_names)} stages",
        ),
        (
            bool(np.isfinite(d.e_NxFxD).all() and np.isfinite(d.logits_NxK).all()),
            "embeddings or soft labels hold NaN or Inf",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(f"{path}: {msg}.")


def from_run(
    workdir: str, memory, feature_map, stage_names, teacher_root: str, teacher_embed, ratio
):
    """The Distilled of a finished distillation: D_syn^T and the final teacher it belongs to."""
    from diet_jax import parallel
    from diet_jax.train.reference import checkpoint_dir

    t = len(stage_names)
    ckpt = os.path.abspath(checkpoint_dir(teacher_root, t))
    root = os.path.abspath(workdir)
    if os.path.commonpath([ckpt, root]) == root:
        ckpt = os.path.relpath(ckpt, root)
    return Distilled(
        e_NxFxD=parallel.to_host(memory.e_NxFxD).astype(np.float32),
        logits_NxK=parallel.to_host(memory.logits_NxK).astype(np.float32),
        origin_N=parallel.to_host(memory.origin_N).astype(np.int32),
        row_N=parallel.to_host(memory.row_N).astype(np.int32),
        stage_names=tuple(stage_names),
        fields=tuple(feature_map.fields),
        tasks=tuple(feature_map.tasks),
        vocab_sizes=tuple(int(v) for v in feature_map.vocab_sizes),
        dataset=feature_map.dataset,
        ratio=float(ratio),
        teacher_checkpoint=ckpt,
        teacher_stage=t,
        teacher_embed_sha256=table_sha256(teacher_embed),
    )


def save_run(config, workdir: str, store, ref, dist) -> str | None:
    """The pipeline's call: writes `<workdir>/distilled.npz` after distillation. Skipped when
    every stage was restored and the file is there (a rerun); None when nothing was distilled."""
    path = os.path.join(workdir, FILENAME)
    if dist.final is None:
        return None
    if os.path.exists(path) and list(dist.restored) == list(dist.stage_names):
        return path
    d = from_run(
        workdir,
        dist.final,
        store.feature_map,
        dist.stage_names,
        ref.root,
        ref.final.params["embed"],
        config.ratio,
    )
    return save(path, d)
