"""The offline replica: every source host served on loopback at MIRROR/HOST/PATH, from generated files."""

from __future__ import annotations

import importlib
import logging
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

from emdata.errors import InvalidParameterError
from emdata.offline.replica.server import Faults, ReplicaServer, cache_root, serve_in_thread

log = logging.getLogger(__name__)

Profile = Literal["full", "small"]
PROFILES: tuple[Profile, ...] = ("full", "small")

# source name -> module under emdata.offline.replica that defines VERSION (int) and build(root: Path, profile) -> None.
# "full" keeps the real shapes where the time budget allows; "small" is for the test suite.
SOURCE_MODULES: dict[str, str] = {
    "epfl": "emdata.offline.replica.epfl",
    "hemibrain": "emdata.offline.replica.hemibrain",
    "empiar": "emdata.offline.replica.empiar",
    "idr": "emdata.offline.replica.idr",
    "openorganelle": "emdata.offline.replica.openorganelle",
}

__all__ = ["Faults", "ReplicaServer", "SOURCE_MODULES", "build_replica", "serve_in_thread", "cache_root"]


def _builder(source: str) -> tuple[int, Callable[[Path, Profile], None]]:
    module = importlib.import_module(SOURCE_MODULES[source])
    return module.VERSION, module.build


def validate_sources(sources: Iterable[str] | None) -> list[str]:
    names = list(SOURCE_MODULES) if sources is None else list(sources)
    unknown = [s for s in names if s not in SOURCE_MODULES]
    if unknown:
        raise InvalidParameterError(f"unknown replica source(s) {unknown}; valid: {sorted(SOURCE_MODULES)}")
    return names


def build_replica(profile: Profile = "full", sources: Iterable[str] | None = None,
                  root: Path | None = None) -> Path:
    """Generate (once, then cached) the files of each source under ``root/<profile>`` and return that folder."""
    if profile not in PROFILES:
        raise InvalidParameterError(f"unknown replica profile {profile!r}; valid: {list(PROFILES)}")
    names = validate_sources(sources)
    tree = (root or cache_root()) / profile
    tree.mkdir(parents=True, exist_ok=True)
    for name in names:
        version, build = _builder(name)
        marker = tree / ".built" / f"{name}-v{version}"
        if marker.exists():
            continue
        log.info("replica: generating %s (%s profile) under %s", name, profile, tree)
        # Files of an older version of this source go first: a chunk the new build leaves empty (absent)
        # must not be served from the old one.
        for old in (tree / ".built").glob(f"{name}-v*"):
            for line in old.read_text().splitlines():
                (tree / line).unlink(missing_ok=True)
            old.unlink()
        staging = tree / ".staging" / name
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        build(staging, profile)
        # Move the finished tree into place file by file: sources may share a host folder.
        files = sorted(p.relative_to(staging) for p in staging.rglob("*") if p.is_file())
        for rel in files:
            dst = tree / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).replace(dst)
        shutil.rmtree(staging, ignore_errors=True)
        marker.parent.mkdir(exist_ok=True)
        marker.write_text("".join(f"{rel.as_posix()}\n" for rel in files))  # the manifest of this build
    return tree
