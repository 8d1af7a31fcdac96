"""Tensorstore over HTTP for the sources that read chunked volumes remotely (precomputed, zarr v2).

One context per run (request concurrency, the run's retry policy, a bounded cache), and one streaming copy
from a remote array into a local zarr array, shard by shard, with reads in flight and progress logged.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorstore as ts
import zarr

from emdata import ngff
from emdata.errors import DownloadError, SourceMismatchError
from emdata.acquire.params import DownloadConfig

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0


def tensorstore_context(download: DownloadConfig, *, concurrency: int, cache_bytes: int,
                        copy_threads: int | None = None) -> ts.Context:
    """Shared tensorstore resources: ``concurrency`` HTTP requests in flight, the run's retry policy.

    The cache pool holds shard and minishard indices (without it every chunk would fetch its index again)
    and decoded chunks that straddle two blocks of a read.
    """
    spec: dict[str, Any] = {
        "http_request_concurrency": {"limit": int(concurrency)},
        "http_request_retries": {"max_retries": int(download.retries),
                                 "initial_delay": f"{max(download.backoff_s, 0.001)}s",
                                 "max_delay": f"{download.backoff_max_s}s"},
        "cache_pool": {"total_bytes_limit": int(cache_bytes)},
    }
    if copy_threads is not None:
        spec["data_copy_concurrency"] = {"limit": int(copy_threads)}
    return ts.Context(spec)


def ts_result(future: Any, what: str) -> Any:
    """A tensorstore future's value; its errors (ValueError for any HTTP status) become DownloadError."""
    try:
        return future.result()
    except ValueError as exc:
        raise DownloadError(f"reading {what} failed (after the configured retries): {exc}") from exc


def stream_to_zarr(source: ts.TensorStore, dest: zarr.Array, origin: Sequence[int], *, max_inflight_bytes: float,
                   what: str, verify: bool = False) -> dict[str, float]:
    """Copy ``source[origin : origin + dest.shape]`` (z, y, x) into ``dest`` one output shard at a time.

    Reads of the next shards are in flight (up to ``max_inflight_bytes`` of decoded voxels) while one is being
    compressed and written, so the link stays busy and memory is bounded by that budget. With ``verify``,
    each shard is read back and compared (SourceMismatchError on a difference). ``what`` names the source in
    progress lines and errors (never a URL with credentials).
    """
    block = dest.shards or dest.chunks
    slices = list(ngff.block_slices(dest.shape, block))
    depth = max(1, int(max_inflight_bytes // (math.prod(block) * dest.dtype.itemsize)))
    pending: deque[tuple[tuple[slice, ...], Any]] = deque()
    total_bytes = math.prod(dest.shape) * dest.dtype.itemsize
    began = last_log = time.monotonic()
    done = done_bytes = 0
    it = iter(slices)

    def submit() -> None:
        sl = next(it, None)
        if sl is not None:
            src = tuple(slice(o + s.start, o + s.stop) for o, s in zip(origin, sl, strict=True))
            pending.append((sl, source[src].read()))

    for _ in range(depth):
        submit()
    try:
        while pending:
            sl, future = pending.popleft()
            data = ts_result(future, f"{what} at {sl}")
            submit()
            dest[sl] = data
            if verify and not np.array_equal(dest[sl], data):
                raise SourceMismatchError(f"the output does not read back equal to {what} at {sl}")
            done += 1
            done_bytes += data.nbytes
            now = time.monotonic()
            if now - last_log >= PROGRESS_EVERY_S or done == len(slices):
                rate = done_bytes / max(now - began, 1e-9)
                log.info("%s: %d/%d shards, %.0f of %.0f MB, %.1f MB/s, ETA %.0f s", what, done, len(slices),
                         done_bytes / 1e6, total_bytes / 1e6, rate / 1e6, (total_bytes - done_bytes) / max(rate, 1e-9))
                last_log = now
    finally:
        for _, future in pending:  # on an error: stop the reads still in flight
            future.cancel()
    seconds = time.monotonic() - began
    return {"bytes": done_bytes, "seconds": round(seconds, 3), "MBps": round(done_bytes / 1e6 / max(seconds, 1e-9), 1)}
