"""The offline replica: every source host served on loopback at MIRROR/HOST/PATH, from generated files."""

from __future__ import annotations

import importlib
import logging
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Literal

from emdata.catalog import DATASETS
from emdata.errors import InvalidParameterError
from emdata.offline.replica.server import Behaviour, Faults, Provider, ReplicaServer, cache_root, serve_in_thread

log = logging.getLogger(__name__)

Profile = Literal["full", "small", "half", "double", "quad"]
PROFILES: tuple[Profile, ...] = ("full", "small", "half", "double", "quad")
# Every source serves "full" and "small"; a source module lists any other profile it serves in EXTRA_PROFILES
# ("half", "double", "quad": a file source at about half, twice or four times full's voxels, for
# bench/bench_memory.py's sizes).
BASE_PROFILES: tuple[Profile, ...] = ("full", "small")

# Each dataset of emdata.catalog has a module emdata.offline.replica.<name> that defines VERSION (int) and
# build(root: Path, profile) -> None, and may define providers(root: Path, profile) -> {path prefix: Provider}
# for content generated on request. "full" keeps the real shapes where the time budget allows; "small" is for
# the test suite.
__all__ = ["Behaviour", "Faults", "ReplicaServer", "build_replica", "cache_root", "replica_providers",
           "serve_in_thread"]


def _module(source: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{source}")


def _builder(source: str) -> tuple[int, Callable[[Path, Profile], None]]:
    module = _module(source)
    return module.VERSION, module.build


def validate_sources(sources: Iterable[str] | None) -> list[str]:
    names = list(DATASETS) if sources is None else list(sources)
    unknown = [s for s in names if s not in DATASETS]
    if unknown:
        raise InvalidParameterError(f"unknown replica source(s) {unknown}; valid: {sorted(DATASETS)}")
    return names


def replica_providers(tree: Path, profile: Profile = "full", sources: Iterable[str] | None = None
                      ) -> dict[str, Provider]:
    """The generated-on-request content of ``sources`` for a server of ``tree`` (built by ``build_replica``)."""
    providers: dict[str, Provider] = {}
    for name in validate_sources(sources):
        make = getattr(_module(name), "providers", None)
        if make is not None:
            providers.update(make(tree, profile))
    return providers


def build_replica(profile: Profile = "full", sources: Iterable[str] | None = None,
                  root: Path | None = None) -> Path:
    """Generate (once, then cached) the files of each source under ``root/<profile>`` and return that folder."""
    if profile not in PROFILES:
        raise InvalidParameterError(f"unknown replica profile {profile!r}; valid: {list(PROFILES)}")
    names = validate_sources(sources)
    unserved = [n for n in names if profile not in BASE_PROFILES + tuple(getattr(_module(n), "EXTRA_PROFILES", ()))]
    if unserved:
        raise InvalidParameterError(f"replica profile {profile!r} is not served by {unserved}")
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
