"""A bounded cache of decoded chunks: an LRU for the shard reader and the zarr fallback, tensorstore's cache_pool."""

from __future__ import annotations

import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from emdata.errors import InvalidParameterError

DEFAULT_CACHE_BYTES = 512 * 2**20
# Buffers of dropped chunks set aside for the next decode: at most this much, and an eighth of the cache's bound.
_SPARE_MAX_BYTES = 64 * 2**20
# Reuse relies on reference counts telling when no view of a buffer is left, which needs the GIL.
_REFCOUNTS_TELL = getattr(sys, "_is_gil_enabled", lambda: True)()


class ChunkCache:
    """Decoded chunks shared by every array opened with it, bounded by ``total_bytes`` (0 disables caching).

    Overlapping blocks (halo, overlap, aligned samples of image and labels) decode each storage chunk once
    while it stays cached: the shard reader (``emdata.shards``) and the zarr-python fallback keep
    decoded chunks in a least-recently-used dict with this bound; arrays read by tensorstore share one
    ``cache_pool`` context with the same bound.
    """

    def __init__(self, total_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if isinstance(total_bytes, bool) or int(total_bytes) != total_bytes or total_bytes < 0:
            raise InvalidParameterError(f"total_bytes must be a non-negative int, got {total_bytes!r}")
        self.total_bytes = int(total_bytes)
        self._lru: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._ts_context: Any = None
        self._loading: dict[Hashable, Future[np.ndarray]] = {}
        self.hits = 0
        self.misses = 0
        self.reused = 0  # buffers of dropped chunks handed out again by ``buffer``
        self._spare: dict[int, list[np.ndarray]] = {}  # nbytes -> buffers of dropped chunks
        self._spare_bytes = 0
        self._spare_limit = min(_SPARE_MAX_BYTES, self.total_bytes // 8) if _REFCOUNTS_TELL else 0
        self._made: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()

    def __reduce__(self) -> tuple[Any, ...]:
        # A cache is per process: another process gets an empty one with the same bound. Arrays pickled
        # together keep sharing one cache (pickle memoizes it).
        return (ChunkCache, (self.total_bytes,))

    @property
    def ts_context(self) -> Any:
        """The tensorstore Context holding the shared ``cache_pool`` (created on first use)."""
        with self._lock:
            if self._ts_context is None:
                import tensorstore as ts

                self._ts_context = ts.Context({"cache_pool": {"total_bytes_limit": self.total_bytes}})
            return self._ts_context

    def _lookup(self, key: Hashable) -> np.ndarray | None:
        """The cached chunk (now the most recently used) or None; the caller holds the lock."""
        chunk = self._lru.get(key)
        if chunk is not None:
            self._lru.move_to_end(key)
            self.hits += 1
        return chunk

    def get(self, key: Hashable) -> np.ndarray | None:
        """The cached chunk, or None (nothing is loaded)."""
        with self._lock:
            return self._lookup(key)

    def get_many(self, keys: Sequence[Hashable]) -> list[np.ndarray | None]:
        """``get`` of each key, under one lock."""
        with self._lock:
            return [self._lookup(key) for key in keys]

    def get_or_load(self, key: Hashable, load: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached chunk, or ``load()`` it once even when several threads miss it at the same time."""
        return self.load_many([key], lambda _: [load()])[0]

    def load_many(self, keys: Sequence[Hashable],
                  load: Callable[[list[int]], Iterable[np.ndarray]]) -> list[np.ndarray]:
        """The chunks of ``keys``: cached ones, the others from ``load(positions)`` (in that order) in this
        thread, except those another thread is loading already, which are awaited after ours are loaded
        (each thread loads its own first, so two threads never wait for each other)."""
        results: list[np.ndarray | None] = [None] * len(keys)
        mine: list[tuple[int, Future[np.ndarray]]] = []
        waits: list[tuple[int, Future[np.ndarray]]] = []
        with self._lock:
            for n, key in enumerate(keys):
                chunk = self._lookup(key)
                if chunk is not None:
                    results[n] = chunk
                elif key in self._loading:
                    self.hits += 1
                    waits.append((n, self._loading[key]))
                else:
                    self.misses += 1
                    fut: Future[np.ndarray] = Future()
                    self._loading[key] = fut
                    mine.append((n, fut))
        try:
            if mine:
                for (n, fut), chunk in zip(mine, load([n for n, _ in mine]), strict=True):
                    self.put(keys[n], chunk)
                    fut.set_result(chunk)
                    results[n] = chunk
        except BaseException as exc:
            for _, fut in mine:
                if not fut.done():
                    fut.set_exception(exc)
            raise
        finally:
            with self._lock:
                for n, _ in mine:
                    self._loading.pop(keys[n], None)
        for n, fut in waits:
            results[n] = fut.result()
        return results  # type: ignore[return-value]

    def put(self, key: Hashable, chunk: np.ndarray) -> None:
        if chunk.nbytes > self.total_bytes:
            return
        chunk.setflags(write=False)
        with self._lock:
            old = self._lru.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._lru[key] = chunk
            self._bytes += chunk.nbytes
            while self._bytes > self.total_bytes:
                _, evicted = self._lru.popitem(last=False)
                self._bytes -= evicted.nbytes
                self._set_aside(evicted)

    def release(self, keys: Iterable[Hashable]) -> None:
        """Drop these chunks (those cached): no read needs them any more; their memory serves the next decode."""
        with self._lock:
            for key in keys:
                chunk = self._lru.pop(key, None)
                if chunk is not None:
                    self._bytes -= chunk.nbytes
                    self._set_aside(chunk)

    def buffer(self, nbytes: int) -> np.ndarray:
        """A uint8 array of ``nbytes`` to decode a chunk into: the memory of a dropped chunk that no view uses
        any more, else a new array."""
        with self._lock:
            spare = self._spare.get(nbytes)
            while spare:
                buf = spare.pop()
                self._spare_bytes -= nbytes
                # This name and getrefcount's argument, nothing else: no view of it (each holds its base) is left,
                # and none can be made but from here. Otherwise a reader still copies from it: let it go.
                if sys.getrefcount(buf) == 2:
                    self.reused += 1
                    return buf
                del buf
        buf = np.empty(nbytes, np.uint8)
        if self._spare_limit:
            with self._lock:
                self._made[id(buf)] = buf
        return buf

    def _set_aside(self, chunk: np.ndarray) -> None:
        """Keep the buffer behind a dropped chunk for ``buffer`` if it came from there and there is room."""
        owner = chunk.base if chunk.base is not None else chunk
        if (not isinstance(owner, np.ndarray) or self._made.get(id(owner)) is not owner
                or self._spare_bytes + owner.nbytes > self._spare_limit):
            return
        self._spare.setdefault(owner.nbytes, []).append(owner)
        self._spare_bytes += owner.nbytes

    @property
    def nbytes(self) -> int:
        """Bytes held by the zarr-fallback LRU (tensorstore accounts for its own pool)."""
        return self._bytes


_default_cache: ChunkCache | None = None
_default_lock = threading.Lock()


def default_cache() -> ChunkCache:
    """The process-wide cache used when ``open_array`` is given none."""
    global _default_cache
    with _default_lock:
        if _default_cache is None:
            _default_cache = ChunkCache()
        return _default_cache
