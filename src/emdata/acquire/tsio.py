"""Tensorstore reads for the sources that read chunked volumes remotely (precomputed, zarr v2).

Stores are opened through the run context (``RunContext.open_tensorstore``); this module reads boxes of an
opened store for ``ngff.write_image``, several reads in flight, and turns tensorstore's errors into ours.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorstore as ts

from emdata import ngff
from emdata.acquire.urls import redact_text
from emdata.errors import DownloadError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadPolicy:
    """Deadline and retries of one box read through tensorstore (from the run's ``download`` params).

    tensorstore's HTTP store has no read timeout of its own: a server that accepts a request and never answers
    would hang a read forever. Each read is given ``timeout_s`` (a stall watchdog: cancelled, then retried or
    failed naming the box); a failed read (a truncated or undecodable chunk, a dropped connection) is retried
    ``retries`` times, waiting ``backoff_s`` doubled each time. Missing keys (403) are never retried.
    """

    timeout_s: float = 60.0
    retries: int = 5
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0


def ts_result(future: Any, what: str, timeout_s: float | None = None) -> Any:
    """A tensorstore future's value within ``timeout_s``; its errors become DownloadError naming ``what``."""
    try:
        return future.result(timeout=timeout_s)
    except TimeoutError as exc:
        future.cancel()
        raise DownloadError(f"reading {what} stalled: no answer within {timeout_s:g} s (cancelled)") from exc
    except ValueError as exc:
        raise DownloadError(f"reading {what} failed: {redact_text(_first_line(exc))}") from exc


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _permanent(exc: BaseException) -> bool:
    """Errors no retry mends: a forbidden key (403) or a bad request."""
    text = str(exc)
    return "PERMISSION_DENIED" in text or "HTTP code 403" in text or "INVALID_ARGUMENT" in text


def remote_blocks(source: ts.TensorStore, shape: Sequence[int], origin: Sequence[int], *, dtype: Any,
                  max_inflight_bytes: float, what: str, policy: ReadPolicy | None = None) -> ngff.Blocks:
    """``source[origin : origin + shape]`` (z, y, x) as ``ngff.Blocks``: read box by box, several reads in flight."""

    def read(boxes: Sequence[tuple[slice, ...]]) -> Iterator[np.ndarray]:
        return read_boxes(source, boxes, origin, dtype=np.dtype(dtype), max_inflight_bytes=max_inflight_bytes,
                          what=what, policy=policy)

    return ngff.Blocks(tuple(shape), np.dtype(dtype), read)  # type: ignore[arg-type]


def read_boxes(source: ts.TensorStore, boxes: Sequence[tuple[slice, ...]], origin: Sequence[int], *,
               dtype: np.dtype, max_inflight_bytes: float, what: str,
               policy: ReadPolicy | None = None) -> Iterator[np.ndarray]:
    """Yield ``source[origin + box]`` for each box (z, y, x), in order, with the next reads in flight.

    Reads are issued ahead up to ``max_inflight_bytes`` of decoded voxels while the caller handles one, so the
    link stays busy and memory is bounded by that budget. Each read has the ``policy``'s deadline and retries.
    ``what`` names the source in errors (never a URL with credentials). Leaving the generator early cancels the
    reads still in flight.
    """
    policy = policy or ReadPolicy()
    largest = max((math.prod(s.stop - s.start for s in box) for box in boxes), default=1)
    depth = max(1, int(max_inflight_bytes // (largest * np.dtype(dtype).itemsize)))
    pending: deque[tuple[tuple[slice, ...], Any]] = deque()
    it = iter(boxes)

    def view(box: tuple[slice, ...]) -> Any:
        return source[tuple(slice(o + s.start, o + s.stop) for o, s in zip(origin, box, strict=True))]

    def submit() -> None:
        box = next(it, None)
        if box is not None:
            pending.append((box, view(box).read()))

    for _ in range(depth):
        submit()
    try:
        while pending:
            box, future = pending.popleft()
            for attempt in range(policy.retries + 1):
                try:
                    data = ts_result(future, f"{what} at {box}", policy.timeout_s)
                    break
                except DownloadError as exc:
                    cause = exc.__cause__
                    if attempt == policy.retries or (cause is not None and _permanent(cause)):
                        raise DownloadError(f"{exc} (after {attempt + 1} attempt(s))") from cause
                    delay = min(policy.backoff_s * 2**attempt, policy.backoff_max_s)
                    log.warning("%s; retry %d/%d in %.1f s", exc, attempt + 1, policy.retries, delay)
                    time.sleep(delay)
                    future = view(box).read()
            submit()
            yield data
    finally:
        for _, future in pending:
            future.cancel()
