"""Tensorstore reads for the sources that read chunked volumes remotely (precomputed, zarr v2).

Stores are opened through the run context (``RunContext.open_tensorstore``); this module reads boxes of an
opened store for ``ngff.write_image``, several reads in flight, and turns tensorstore's errors into ours.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from emdata import ngff
from emdata.errors import DownloadError

log = logging.getLogger(__name__)


def ts_result(future: Any, what: str) -> Any:
    """A tensorstore future's value; its errors (ValueError for any HTTP status) become DownloadError."""
    try:
        return future.result()
    except ValueError as exc:
        raise DownloadError(f"reading {what} failed (after the configured retries): {exc}") from exc


def remote_blocks(source: ts.TensorStore, shape: Sequence[int], origin: Sequence[int], *, dtype: Any,
                  max_inflight_bytes: float, what: str) -> ngff.Blocks:
    """``source[origin : origin + shape]`` (z, y, x) as ``ngff.Blocks``: read box by box, several reads in flight."""

    def read(boxes: Sequence[tuple[slice, ...]]) -> Iterator[np.ndarray]:
        return read_boxes(source, boxes, origin, dtype=np.dtype(dtype), max_inflight_bytes=max_inflight_bytes,
                          what=what)

    return ngff.Blocks(tuple(shape), np.dtype(dtype), read)  # type: ignore[arg-type]


def read_boxes(source: ts.TensorStore, boxes: Sequence[tuple[slice, ...]], origin: Sequence[int], *,
               dtype: np.dtype, max_inflight_bytes: float, what: str) -> Iterator[np.ndarray]:
    """Yield ``source[origin + box]`` for each box (z, y, x), in order, with the next reads in flight.

    Reads are issued ahead up to ``max_inflight_bytes`` of decoded voxels while the caller handles one, so the
    link stays busy and memory is bounded by that budget. ``what`` names the source in errors (never a URL
    with credentials). Leaving the generator early cancels the reads still in flight.
    """
    largest = max((math.prod(s.stop - s.start for s in box) for box in boxes), default=1)
    depth = max(1, int(max_inflight_bytes // (largest * np.dtype(dtype).itemsize)))
    pending: deque[tuple[tuple[slice, ...], Any]] = deque()
    it = iter(boxes)

    def submit() -> None:
        box = next(it, None)
        if box is not None:
            src = tuple(slice(o + s.start, o + s.stop) for o, s in zip(origin, box, strict=True))
            pending.append((box, source[src].read()))

    for _ in range(depth):
        submit()
    try:
        while pending:
            box, future = pending.popleft()
            data = ts_result(future, f"{what} at {box}")
            submit()
            yield data
    finally:
        for _, future in pending:
            future.cancel()
