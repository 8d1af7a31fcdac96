"""Decode the chunks of a local sharded zarr v3 array straight from its shard files (the production layout); remote
shards: ``emdata.access.remote.RemoteShardReader``, built on this reader.

For arrays whose shards hold ``bytes`` + ``blosc`` chunks (what ``emdata.ngff`` writes), reading a chunk is: read
its (offset, length) from the shard index, ``pread`` those bytes, blosc-decode them with numcodecs (the same
c-blosc). Measured on the benchmark volume this costs about half the CPU of the same chunk through tensorstore
(bench/bench_access.py; DATA_ACCESS_DESIGN.md, "Reading chunks"). Anything else (other codecs, another index
layout, a key encoding we don't know) returns ``None`` from ``ShardReader.for_array`` and is read by tensorstore.

The shard index is verified against its crc32c, as zarr-python and tensorstore do; each chunk's blosc header must
say the chunk's full decoded size and exactly the stored length before anything is decoded (numcodecs would
decode a smaller frame into part of the buffer, and c-blosc 1 trusts the header's length). Data is treated as
immutable once opened (as tensorstore's ``recheck_cached_data="open"``): shard indexes are cached and shard files
kept open.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from emdata.errors import EmDataError

_EMPTY = 2**64 - 1
_MAX_CACHED_INDEXES = 4096
_MAX_OPEN_FILES = 64  # shard files kept open per reader (an fd each; Linux allows 1024 per process by default)


def _close_all(files: OrderedDict[tuple[int, ...], list[Any]], lock: threading.Lock) -> None:
    """Close a reader's shard files once the reader is gone."""
    with lock:
        for fd, _ in files.values():
            if fd is not None:
                os.close(fd)
        files.clear()


class CorruptShardError(EmDataError, ValueError):
    """A shard file whose index fails its checksum or points outside the file."""


class ShardReader:
    """Reads decoded chunks (full chunk shape, native byte order, read-only) of one sharded zarr v3 array."""

    remote = False  # reads wait on a network (RemoteShardReader): callers keep more reads in flight

    def __init__(self, adir: Path | str, *, shape: tuple[int, ...], chunks: tuple[int, ...], shards: tuple[int, ...],
                 dtype: np.dtype, stored: np.dtype, fill_value: Any, separator: str, index_at_end: bool) -> None:
        self.adir = adir
        self.shape, self.chunks_shape, self.shards = shape, chunks, shards
        self.dtype, self.stored = dtype, stored
        self.fill_value = fill_value
        self.separator = separator
        self.index_at_end = index_at_end
        self.per_shard = tuple(s // c for s, c in zip(shards, chunks, strict=True))
        self.n_per_shard = math.prod(self.per_shard)
        self.index_bytes = self.n_per_shard * 16 + 4
        self.chunk_nbytes = math.prod(chunks) * dtype.itemsize
        self._indexes: dict[tuple[int, ...], np.ndarray] = {}
        self._lock = threading.Lock()
        self._index_lock = threading.Lock()
        self.chunk_reads = 0  # chunks read from their shard file (tests count them)
        self.index_reads = 0
        import google_crc32c  # zarr-python's own dependency for the index checksum
        from numcodecs.blosc import decompress  # what numcodecs' Blosc.decode calls, without its wrapping

        self._crc32c: Any = google_crc32c
        self._decompress: Any = decompress
        # Open shard files, most recently used last: sidx -> [fd or None (no such file), readers using it].
        self._files: OrderedDict[tuple[int, ...], list[Any]] = OrderedDict()
        self._files_lock = threading.Lock()
        weakref.finalize(self, _close_all, self._files, self._files_lock)

    @classmethod
    def for_array(cls, adir: Path, dtype: np.dtype, fill_value: Any) -> ShardReader | None:
        """A reader if ``adir`` is a local sharded array with ``bytes`` + ``blosc`` chunks, else None."""
        try:
            meta = json.loads((adir / "zarr.json").read_text())
        except (OSError, ValueError):
            return None
        layout = sharded_layout(meta, dtype)
        return None if layout is None else cls(adir, dtype=dtype, fill_value=fill_value, **layout)

    def shard_path(self, sidx: tuple[int, ...]) -> Path | str:
        return Path(self.adir) / self._shard_name(sidx)

    def _shard_name(self, sidx: tuple[int, ...]) -> str:
        """Shard ``sidx``'s key within the array (default chunk key encoding)."""
        return self.separator.join(("c", *(str(i) for i in sidx)))

    def _decode(self, buf: memoryview, sidx: tuple[int, ...], cidx: tuple[int, ...], offset: int, scratch: bool,
                buffer: Callable[[int], np.ndarray] | None) -> np.ndarray:
        """Chunk ``cidx``'s stored bytes ``buf`` (at ``offset`` of its shard) decoded, once its blosc header says
        the chunk's full size from exactly these bytes (``chunks`` says where it goes)."""
        decoded, stored = _blosc_sizes(buf)
        if decoded != self.chunk_nbytes or stored != len(buf):
            raise CorruptShardError(
                f"{self.shard_path(sidx)}: chunk {cidx} at {offset}+{len(buf)}: its blosc header says "
                f"{decoded} bytes from {stored}, expected {self.chunk_nbytes} from {len(buf)}")
        if scratch:
            out = _decoded_scratch(self.chunk_nbytes)
        else:
            out = np.empty(self.chunk_nbytes, np.uint8) if buffer is None else buffer(self.chunk_nbytes)
        self._decompress(buf, out)
        arr = out.view(self.stored).reshape(self.chunks_shape)
        return arr if self.stored == self.dtype else arr.astype(self.dtype)

    def _span(self, cidx: tuple[int, ...], index: np.ndarray) -> tuple[int, int] | None:
        """(offset, length) of chunk ``cidx`` in its shard, from the shard's index; None: not stored (fill value)."""
        inner = 0
        for i, p in zip(cidx, self.per_shard, strict=True):
            inner = inner * p + i % p
        offset, nbytes = int(index[inner, 0]), int(index[inner, 1])
        return None if offset == _EMPTY and nbytes == _EMPTY else (offset, nbytes)

    def _index(self, sidx: tuple[int, ...], fd: int, size: int) -> np.ndarray:
        cached = self._indexes.get(sidx)
        if cached is not None:
            return cached
        with self._index_lock:  # one reader per index (rare: once per shard), the others wait for it
            cached = self._indexes.get(sidx)
            if cached is not None:
                return cached
            where = size - self.index_bytes if self.index_at_end else 0
            raw = os.pread(fd, self.index_bytes, where) if where >= 0 else b""
            if len(raw) != self.index_bytes:
                raise CorruptShardError(f"{self.shard_path(sidx)}: {size} bytes, too short for its shard index")
            return self._keep_index(sidx, raw)

    def _parse_index(self, sidx: tuple[int, ...], raw: bytes) -> np.ndarray:
        """The index of shard ``sidx`` from its ``index_bytes`` bytes, checked against its crc32c."""
        body, crc = raw[:-4], int.from_bytes(raw[-4:], "little")
        if self._crc32c.value(body) != crc:
            raise CorruptShardError(f"{self.shard_path(sidx)}: the shard index fails its crc32c checksum")
        self.index_reads += 1
        return np.frombuffer(body, "<u8").reshape(-1, 2)

    def _keep_index(self, sidx: tuple[int, ...], raw: bytes) -> np.ndarray:
        """``_parse_index``, cached."""
        index = self._parse_index(sidx, raw)
        if len(self._indexes) >= _MAX_CACHED_INDEXES:
            self._indexes.clear()
        self._indexes[sidx] = index
        return index

    def chunk(self, cidx: tuple[int, ...]) -> np.ndarray:
        """Chunk ``cidx`` decoded: a new array of the chunk shape (fill value where nothing is stored)."""
        (arr,) = self.chunks([cidx])
        return arr

    def chunks(self, cidxs: Sequence[tuple[int, ...]], *, scratch: bool = False,
               buffer: Callable[[int], np.ndarray] | None = None) -> Iterator[np.ndarray]:
        """The chunks ``cidxs`` decoded, in order (consecutive chunks of one shard: one file lookup).

        ``scratch``: each is decoded into this thread's reused buffer, valid until the next one is yielded.
        ``buffer(nbytes)``: where to decode each otherwise (a uint8 array of ``nbytes``), default a new array.
        """
        per = self.per_shard
        open_sidx: tuple[int, ...] | None = None
        fd: int | None = None
        try:
            for cidx in cidxs:
                sidx = tuple(i // p for i, p in zip(cidx, per, strict=True))
                if sidx != open_sidx:
                    if open_sidx is not None:
                        self._release(open_sidx)
                        open_sidx = None
                    fd = self._acquire(sidx)
                    open_sidx = sidx
                if fd is None:
                    yield self._fill()
                    continue
                index = self._indexes.get(sidx)
                if index is None:
                    index = self._index(sidx, fd, os.fstat(fd).st_size)
                span = self._span(cidx, index)
                if span is None:
                    yield self._fill()
                    continue
                offset, nbytes = span
                buf = _scratch(nbytes)
                if os.preadv(fd, [buf], offset) != nbytes:
                    raise CorruptShardError(f"{self.shard_path(sidx)}: chunk {cidx} at {offset}+{nbytes} lies "
                                            f"outside the file")
                with self._lock:
                    self.chunk_reads += 1
                yield self._decode(buf, sidx, cidx, offset, scratch, buffer)
        finally:
            if open_sidx is not None:
                self._release(open_sidx)

    def _acquire(self, sidx: tuple[int, ...]) -> int | None:
        """An open descriptor of shard ``sidx`` (None: no such file, read as fill value), kept open for the next
        reads (``_MAX_OPEN_FILES`` per reader); ``_release`` it after use. A descriptor is closed only when no
        read is using it, so a concurrent ``pread`` never meets a closed (or reused) descriptor."""
        with self._files_lock:
            entry = self._files.get(sidx)
            if entry is not None:
                self._files.move_to_end(sidx)
                entry[1] += 1
                return entry[0]  # type: ignore[no-any-return]
        try:
            fd: int | None = os.open(self.shard_path(sidx), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            fd = None
        with self._files_lock:
            entry = self._files.get(sidx)
            if entry is not None:  # another thread opened it meanwhile: use theirs
                if fd is not None:
                    os.close(fd)
                entry[1] += 1
                return entry[0]  # type: ignore[no-any-return]
            self._files[sidx] = [fd, 1]
            while len(self._files) > _MAX_OPEN_FILES:
                old = next((k for k, (_, users) in self._files.items() if users == 0), None)
                if old is None:
                    break
                old_fd, _ = self._files.pop(old)
                self._indexes.pop(old, None)  # an index is used only with the file it was read from
                if old_fd is not None:
                    os.close(old_fd)
            return fd

    def _release(self, sidx: tuple[int, ...]) -> None:
        with self._files_lock:
            entry = self._files.get(sidx)
            if entry is not None:
                entry[1] -= 1

    def _fill(self) -> np.ndarray:
        return np.full(self.chunks_shape, self.fill_value, dtype=self.dtype)


def sharded_layout(meta: Any, dtype: np.dtype) -> dict[str, Any] | None:
    """The reader's layout arguments from an array's ``zarr.json`` (a dict) if it holds ``bytes`` + ``blosc`` chunks
    in shards with a crc32c-checked little-endian index and default chunk keys; else None (read by another path)."""
    try:
        codecs = meta["codecs"]
        if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
            return None
        conf = codecs[0]["configuration"]
        inner = conf["codecs"]
        if [c["name"] for c in inner] != ["bytes", "blosc"]:
            return None
        index_codecs = conf.get("index_codecs", [{"name": "bytes", "configuration": {"endian": "little"}},
                                                 {"name": "crc32c"}])
        if [c["name"] for c in index_codecs] != ["bytes", "crc32c"] or index_codecs[0].get(
                "configuration", {}).get("endian", "little") != "little":
            return None
        key = meta.get("chunk_key_encoding", {"name": "default"})
        if key["name"] != "default":
            return None
        separator = key.get("configuration", {}).get("separator", "/")
        if meta["chunk_grid"]["name"] != "regular" or meta.get("storage_transformers"):
            return None
        shards = tuple(int(s) for s in meta["chunk_grid"]["configuration"]["chunk_shape"])
        chunks = tuple(int(c) for c in conf["chunk_shape"])
        shape = tuple(int(s) for s in meta["shape"])
        if (len(shards) != len(shape) or len(chunks) != len(shape) or any(c <= 0 for c in chunks)
                or any(s % c for s, c in zip(shards, chunks, strict=True))):
            return None
        endian = inner[0].get("configuration", {}).get("endian", "little")
        if dtype.kind not in "biuf" or dtype.itemsize > 1 and endian not in ("little", "big"):
            return None
        stored = dtype.newbyteorder("<" if endian == "little" else ">") if dtype.itemsize > 1 else dtype
    except (KeyError, TypeError, IndexError, AttributeError, ValueError):
        return None
    return {"shape": shape, "chunks": chunks, "shards": shards, "stored": stored, "separator": separator,
            "index_at_end": conf.get("index_location", "end") == "end"}


_local = threading.local()
_BLOSC_HEADER = struct.Struct("<I4xI")  # after version, versionlz, flags, typesize: nbytes, (blocksize), cbytes


def _blosc_sizes(buf: memoryview) -> tuple[int, int]:
    """(decoded bytes, compressed bytes incl. the header) from a blosc 1 frame's 16-byte header; (-1, -1) if short."""
    if len(buf) < 16:
        return -1, -1
    return _BLOSC_HEADER.unpack_from(buf, 4)  # type: ignore[return-value]


def _scratch(nbytes: int) -> memoryview:
    """A per-thread buffer of at least ``nbytes`` for compressed chunk bytes (no allocation per chunk)."""
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < nbytes:
        buf = _local.buf = memoryview(bytearray(max(nbytes, 1 << 20)))
    return buf[:nbytes]


def _decoded_scratch(nbytes: int) -> np.ndarray:
    """A per-thread array of ``nbytes`` for one decoded chunk."""
    arr = getattr(_local, "decoded", None)
    if arr is None or arr.nbytes < nbytes:
        arr = _local.decoded = np.empty(nbytes, np.uint8)
    return arr[:nbytes]


# One pool of decoding threads per process (numcodecs releases the GIL while decoding), created on first use
# and forgotten in a forked child, whose copy of the pool has no threads.
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def decode_threads() -> int:
    """How many decoding threads: the cores this process may use."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, n)


def decode_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=decode_threads(), thread_name_prefix="emdata-decode")
        return _pool


def _forget_pool() -> None:
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)
