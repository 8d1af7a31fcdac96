"""Tensorstore reads over HTTP: every read has a deadline, transient faults are retried, errors name the box."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts

from emdata.acquire.context import MirrorConfig, RunContext
from emdata.acquire.params import DownloadConfig
from emdata.acquire.tsio import ReadPolicy, read_boxes
from emdata.errors import DownloadError

LIVE = "https://example.org/files/arr"


def _write_array(root: Path) -> np.ndarray:
    data = np.random.default_rng(0).integers(0, 1000, (32, 32, 32), dtype=np.int16)
    store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(root / "example.org/files/arr")},
                     "metadata": {"shape": [32, 32, 32], "chunks": [16, 16, 16], "dtype": "<i2"},
                     "create": True}).result()
    store.write(data).result()
    return data


def _ctx(base_url: str, tmp_path: Path, **download: float) -> RunContext:
    return RunContext(MirrorConfig(base_url), DownloadConfig(backoff_s=0.01, **download), tmp_path)  # type: ignore[arg-type]


BOXES = [tuple(slice(a, a + 16) for a in (z, y, x)) for z in (0, 16) for y in (0, 16) for x in (0, 16)]


def test_reads_survive_a_truncated_and_a_failing_response(file_server, tmp_path):
    server, tree = file_server
    data = _write_array(tree.root)
    ctx = _ctx(server.base_url, tmp_path)
    store = ctx.open_tensorstore({"driver": "zarr"}, LIVE, ctx.tensorstore_context(concurrency=4, cache_bytes=0),
                                 "test array")
    server.faults.path_contains, server.faults.truncate_to_bytes, server.faults.truncate_count = "/0.0.1", 10, 1
    got = list(read_boxes(store, BOXES, (0, 0, 0), dtype=np.dtype(np.int16), max_inflight_bytes=2**20,
                          what="test array", policy=ctx.read_policy))
    for box, block in zip(BOXES, got, strict=True):
        np.testing.assert_array_equal(block, data[box])
    assert server.faults.truncate_count == 0  # the fault happened and was survived


def test_a_server_that_never_answers_fails_within_the_deadline(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:  # accept connections, read nothing, answer nothing
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        ctx = _ctx(f"http://127.0.0.1:{listener.getsockname()[1]}", tmp_path, read_timeout_s=0.5, retries=1)
        began = time.monotonic()
        with pytest.raises(DownloadError, match=r"opening test array at http://127.0.0.1:\d+/example.org/files/arr "
                                                r"stalled"):
            ctx.open_tensorstore({"driver": "zarr"}, LIVE, ctx.tensorstore_context(concurrency=4, cache_bytes=0),
                                 "test array")
        assert time.monotonic() - began < 10
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()


def test_a_read_that_stalls_is_cancelled_retried_then_fails_naming_the_box(file_server, tmp_path):
    server, tree = file_server
    _write_array(tree.root)
    ctx = _ctx(server.base_url, tmp_path, read_timeout_s=0.3, retries=1)
    store = ctx.open_tensorstore({"driver": "zarr"}, LIVE, ctx.tensorstore_context(concurrency=4, cache_bytes=0),
                                 "test array")
    server.faults.latency_s = 3.0  # every answer from now on comes too late
    began = time.monotonic()
    with pytest.raises(DownloadError, match=r"reading test array at \(slice\(0, 16.*stalled.*after 2 attempt"):
        list(read_boxes(store, BOXES[:1], (0, 0, 0), dtype=np.dtype(np.int16), max_inflight_bytes=2**20,
                        what="test array", policy=ReadPolicy(timeout_s=0.3, retries=1, backoff_s=0.01)))
    assert time.monotonic() - began < 5
    server.faults.latency_s = 0.0


def test_a_mirror_password_from_netrc_is_sent_but_never_shown(file_server, tmp_path, monkeypatch):
    server, tree = file_server
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text("machine 127.0.0.1 login labuser password FAKEnetrcPW-5e2\n")
    (home / ".netrc").chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    ctx = _ctx(server.base_url, tmp_path, retries=0)
    assert any("Authorization: Basic" in h for h in ctx.kvstore(LIVE)["headers"])  # sent to the mirror
    with pytest.raises(DownloadError) as err:  # nothing there: opening fails
        ctx.open_tensorstore({"driver": "zarr"}, LIVE, ctx.tensorstore_context(concurrency=2, cache_bytes=0),
                             "test array")
    import base64

    hidden = base64.b64encode(b"labuser:FAKEnetrcPW-5e2").decode()
    assert "FAKEnetrcPW-5e2" not in str(err.value) and hidden not in str(err.value)
    assert err.value.__cause__ is None  # the library's own message (which may echo the request) is not chained
