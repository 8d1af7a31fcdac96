"""Shared fixtures: the replica (small profile) and plain file trees served on loopback, port 0."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from emdata.offline.replica import ReplicaServer, build_replica, replica_providers, serve_in_thread


@pytest.fixture(scope="session")
def replica_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every source's small replica (``HOST/PATH`` folders), built once per session and shared: read-only.

    A test that tampers with documents or files uses ``replica_copy`` instead.
    """
    return build_replica("small", None, tmp_path_factory.mktemp("replica-cache"))


@pytest.fixture(scope="session")
def _replica_session_server(replica_tree: Path) -> Iterator[ReplicaServer]:
    with serve_in_thread(replica_tree, providers=replica_providers(replica_tree, "small")) as server:
        yield server


@pytest.fixture()
def replica(_replica_session_server: ReplicaServer) -> ReplicaServer:
    """The shared replica on loopback, its faults off and its request log empty for this test."""
    _replica_session_server.reset_faults()
    return _replica_session_server


@pytest.fixture()
def replica_copy(replica_tree: Path, tmp_path: Path) -> Path:
    """A private copy of the small replica (13 MB) that a test may tamper with."""
    return Path(shutil.copytree(replica_tree, tmp_path / "replica"))


@pytest.fixture()
def replica_copy_server(replica_copy: Path) -> Iterator[ReplicaServer]:
    with serve_in_thread(replica_copy, providers=replica_providers(replica_copy, "small")) as server:
        yield server


class FileTree:
    """Random files under ROOT/example.org/files/ served by the replica server, with their sha256."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, bytes] = {}

    def add(self, name: str, size: int, seed: int = 0) -> str:
        data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
        path = self.root / "example.org" / "files" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.files[name] = data
        return f"https://example.org/files/{name}"

    def sha256(self, name: str) -> str:
        return hashlib.sha256(self.files[name]).hexdigest()


@pytest.fixture()
def file_server(tmp_path: Path) -> Iterator[tuple[ReplicaServer, FileTree]]:
    tree = FileTree(tmp_path / "served")
    tree.root.mkdir()
    with serve_in_thread(tree.root) as server:
        yield server, tree
