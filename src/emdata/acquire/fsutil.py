"""Filesystem helpers: outputs appear whole or not at all."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from emdata.errors import EmDataError

log = logging.getLogger(__name__)


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield an empty folder beside ``dest``; on success it replaces ``dest``, on error it is removed.

    An existing ``dest`` stays untouched until the new one is complete. Folders a killed run left beside
    ``dest`` (``.<name>.*.tmp``, ``.<name>.old-*``) are removed first: the caller holds the stage's lock
    (:func:`stage_lock`), so no other run is writing them.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in (*dest.parent.glob(f".{dest.name}.*.tmp"), *dest.parent.glob(f".{dest.name}.old-*")):
        log.warning("removing %s, left by a run that did not finish", stale)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
    tmp.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class StageBusyError(EmDataError, RuntimeError):
    """Another run of the same stage holds its lock."""


@contextmanager
def stage_lock(repo_root: Path, name: str) -> Iterator[None]:
    """Hold ``.emdata/locks/<name>.lock`` for a run of stage ``name``; a second run fails at once, naming it.

    An advisory ``flock``: released by the kernel when the process dies, so a killed run never blocks the next.
    """
    path = Path(repo_root) / ".emdata" / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise StageBusyError(f"stage {name!r} is already running ({holder} holds {path}); wait for it to "
                                 "finish or stop it, then run again") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
