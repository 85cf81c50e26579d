"""One run per workdir: `<workdir>/run.lock` holds the owner's pid, host and start time.

A second run on the same workdir stops at once with a message naming the first. A lock whose
owner is gone (same host, dead pid: a killed run) is taken over with a warning. A lock from
another host cannot be checked and is never taken over: the message says how to remove it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time

from absl import logging

from diet_jax.errors import UserError

FILENAME = "run.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # unreadable (not written by this module): treated as stale below


def _create(path: str, owner: dict) -> bool:
    """Creates the lock file with its content in one step (a hard link of a finished temporary
    file, which fails if the lock exists): no reader ever sees an empty lock. False if one
    exists."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(owner, f)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.remove(tmp)


def acquire(workdir: str) -> str:
    """Takes the workdir's lock; returns its path. Raises UserError if another run holds it."""
    path = os.path.join(workdir, FILENAME)
    host = socket.gethostname()
    owner = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        os.makedirs(workdir, exist_ok=True)
        for _ in range(3):  # retried when a stale lock is removed under a concurrent taker
            if _create(path, owner):
                return path
            other = _read(path)
            pid, other_host = other.get("pid"), other.get("host")
            if other and (other_host != host or (pid != os.getpid() and _alive(int(pid)))):
                raise UserError(
                    f"The workdir {workdir} is in use by another run: pid {pid} on "
                    f"{other_host}, started {other.get('started', '?')} (lock file {path}). "
                    "Wait for it to finish, or choose another --workdir"
                    + ("." if other_host == host else f"; if that run is gone, remove {path}.")
                )
            logging.warning(
                "Taking over the stale lock %s of pid %s on %s (that run is gone).",
                path,
                pid,
                other_host,
            )
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"Cannot write to the workdir {workdir} ({path}): {e.strerror}.") from e
        raise
    raise UserError(f"Could not take the lock {path}: other runs keep taking it.")


def release(path: str) -> None:
    """Removes the lock if this process still owns it."""
    if _read(path).get("pid") == os.getpid() and _read(path).get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def held(workdir: str, enabled: bool = True):
    """The workdir's lock for the duration of the block (a no-op when not `enabled`)."""
    if not enabled:
        yield None
        return
    path = acquire(workdir)
    try:
        yield path
    finally:
        release(path)
