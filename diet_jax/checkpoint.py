"""Orbax helpers and artifact stamps.

`save` / `restore`: one-off saves of a pytree to a folder, restored into a known structure.
Orbax writes to a temporary folder and renames it when the save is complete.

Stamps: every artifact `<path>` (a checkpoint folder, the stage store) is trusted only when
`<path>.stamp.json` exists, holds the fingerprint the run computes now (`fingerprint.py`) and
lists the artifact's files with their sizes (and, for checkpoints, CRC32 checksums) as they are
on disk. The stamp is removed before an artifact is (re)written and written, atomically, after
it is complete: a crash, a full disk or a half-copied folder leaves an artifact without a valid
stamp, which the next run recomputes instead of trusting.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import zlib

import jax
import orbax.checkpoint as ocp
from absl import logging

from diet_jax import fingerprint as fp_lib
from diet_jax import parallel
from diet_jax.io_utils import atomic_write_json, read_json

STAMP = ".stamp.json"


def exists(path: str) -> bool:
    return os.path.isdir(path) and not os.path.basename(path).startswith(".")


def save(path: str, tree, record: dict | None = None) -> None:
    """Saves `tree` to `path`; with a fingerprint `record`, stamps it once complete."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    unstamp(path)
    _remove_orbax_leftovers(path)
    tree = parallel.globalize(tree)  # multi-host: every process saves its shards together
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(path, tree, force=True)
            ckptr.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - Orbax reports storage errors as ValueError text
        _remove_orbax_leftovers(path)
        storage = _storage_errno(str(e))
        if storage is None:
            raise
        raise OSError(storage, os.strerror(storage), path) from e
    if record is not None and parallel.is_main_process():
        stamp(path, record)


def restore(path: str, like):
    """Restores the checkpoint at `path` with the structure, shapes and dtypes of `like`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, parallel.globalize(like))
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.abspath(path), abstract)


_STORAGE_MESSAGES = {
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "Read-only file system": errno.EROFS,
    "Permission denied": errno.EACCES,
}


def _storage_errno(message: str) -> int | None:
    """The errno of a storage error that Orbax (TensorStore) reports only as text."""
    for text, code in _STORAGE_MESSAGES.items():
        if text in message:
            return code
    return None


def _remove_orbax_leftovers(path: str) -> None:
    """Temporary folders of saves that a kill interrupted (Orbax names them <path>.orbax-*)."""
    for tmp in glob.glob(glob.escape(path) + ".orbax-checkpoint-tmp*"):
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- stamps
def stamp_path(path: str) -> str:
    return os.path.abspath(path).rstrip(os.sep) + STAMP


def manifest(path: str, checksums: bool = True) -> dict[str, list]:
    """{relative file: [size, crc32 or None]} of every file under `path` (or of the file)."""
    path = os.path.abspath(path)
    files = (
        [path]
        if os.path.isfile(path)
        else sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    )
    out = {}
    for f in files:
        rel = os.path.relpath(f, path) if f != path else os.path.basename(f)
        out[rel] = [os.path.getsize(f), _crc32(f) if checksums else None]
    return out


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def stamp(path: str, record: dict, checksums: bool = True) -> None:
    """Marks the artifact at `path` complete for the fingerprint `record`."""
    atomic_write_json(
        stamp_path(path),
        {**record, "checksums": checksums, "files": manifest(path, checksums)},
    )


def unstamp(path: str) -> None:
    try:
        os.remove(stamp_path(path))
    except FileNotFoundError:
        pass


def read_stamp(path: str) -> dict | None:
    try:
        return read_json(stamp_path(path))
    except (FileNotFoundError, ValueError):  # missing, or half a file from outside our writes
        return None


def damage(path: str, stamp_record: dict) -> str | None:
    """What is wrong with the files under `path` against its stamp, or None if nothing."""
    want = stamp_record.get("files", {})
    have = manifest(path, stamp_record.get("checksums", True)) if os.path.exists(path) else {}
    for rel in sorted(set(want) | set(have)):
        if rel not in have:
            return f"{rel} is missing"
        if rel not in want:
            return f"{rel} is not part of the finished artifact"
        if have[rel][0] != want[rel][0]:
            return f"{rel} has {have[rel][0]} bytes, {want[rel][0]} expected (truncated?)"
        if have[rel][1] != want[rel][1]:
            return f"{rel} has checksum {have[rel][1]}, {want[rel][1]} expected (corrupt)"
    return None


def valid(path: str, record: dict, what: str) -> bool:
    """True when `path` holds a complete, undamaged `what` for fingerprint `record`.

    Otherwise logs why (the keys that changed, or the damaged file) and returns False, and the
    caller recomputes the artifact. Nothing there at all returns False silently.
    """
    if not os.path.exists(path) and not os.path.exists(stamp_path(path)):
        return False
    old = read_stamp(path)
    if old is None:
        logging.warning("%s at %s has no stamp (unfinished or older run): recomputing", what, path)
        return False
    if old.get("fingerprint") != record["fingerprint"]:
        logging.info(
            "%s at %s is out of date, recomputing; changed: %s",
            what,
            path,
            "; ".join(fp_lib.changes(old, record)),
        )
        return False
    problem = damage(path, old)
    if problem is not None:
        logging.warning("%s at %s is damaged (%s): recomputing", what, path, problem)
        return False
    return True


def discard(path: str) -> None:
    """Removes an artifact and its stamp (stamp first: never a stamp without its artifact)."""
    unstamp(path)
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)
