"""Chunks of the production layout (sharded, ``bytes`` + ``blosc``) from a remote zarr store: a DVC remote,
``s3://``, ``https://`` (DATA_ACCESS_DESIGN.md, "Remote reads")."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from emdata.access.cache import ChunkCache
from emdata.shards import CorruptShardError, ShardReader, sharded_layout

_INDEX_CACHE_BYTES = 64 * 2**20  # shard indexes kept (16 bytes per chunk: 4 MiB for 2^18 chunks)


class RemoteShardReader(ShardReader):
    """The same chunks from shards behind a zarr store that is not a local folder (a URL, a DVC remote).

    zarr-python fetches the chunks it needs from one shard one request after another, and reads the shard's index
    again for every read: over a network each costs a round trip (``bench/bench_access.py --suite remote``, 20 ms
    per response: a 128^3 grid pass through zarr-python takes 3.9x one read of the whole volume, through this
    reader 0.6x). Here each shard's index is fetched once (a suffix range, crc32c-checked, cached), and the
    chunks one call asks for are fetched together: adjacent byte ranges merged into one request, the requests concurrent (at most zarr's
    ``async.concurrency``) through the store's own ``get`` (the same client, credentials and retries as
    zarr-python). Every length comes from the index, which is untrusted: a chunk longer than blosc can make of
    the chunk, or a response of another length than asked, is a ``CorruptShardError`` naming the URL before
    anything is decoded. A shard that is not there reads as the fill value, as zarr-python reads it.
    """

    remote = True
    # Bytes one request may cover when adjacent chunks are merged into it.
    MERGE_BYTES = 16 * 2**20

    def __init__(self, store: Any, prefix: str, where: str, **kwargs: Any) -> None:
        super().__init__(where, **kwargs)
        self.store, self.prefix = store, prefix.strip("/")
        # Shard indexes (a missing shard: an empty one), each fetched once even when several threads ask at once
        # (the others wait for it).
        self._index_cache = ChunkCache(_INDEX_CACHE_BYTES)
        # A blosc 1 frame holds at most the decoded bytes and its 16-byte header (stored uncompressed otherwise).
        self.max_stored = self.chunk_nbytes + 16

    @classmethod
    def for_zarr(cls, zarray: Any, where: str, dtype: np.dtype, fill_value: Any) -> RemoteShardReader | None:
        """A reader for a zarr-python array of the production layout in a remote store (``where``: its URL or name
        for messages), else None."""
        try:
            meta = zarray.metadata.to_dict()
            store = zarray.store
        except AttributeError:
            return None
        layout = sharded_layout(meta, dtype)
        if layout is None:
            return None
        return cls(store, str(zarray.path), where, dtype=dtype, fill_value=fill_value, **layout)

    def shard_path(self, sidx: tuple[int, ...]) -> str:
        return f"{str(self.adir).rstrip('/')}/{self._shard_name(sidx)}"

    def _key(self, sidx: tuple[int, ...]) -> str:
        return f"{self.prefix}/{self._shard_name(sidx)}" if self.prefix else self._shard_name(sidx)

    def _get(self, requests: list[tuple[tuple[int, ...], int | None, int]]) -> list[bytes | None]:
        """Each (shard, start or None for the last ``n`` bytes, n) fetched concurrently: bytes, or None where the
        shard does not exist."""
        import asyncio

        import zarr
        from zarr.abc.store import RangeByteRequest, SuffixByteRequest
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        prototype = default_buffer_prototype()
        limit = asyncio.Semaphore(max(1, int(zarr.config.get("async.concurrency") or 10)))

        async def one(sidx: tuple[int, ...], start: int | None, n: int) -> bytes | None:
            rng = SuffixByteRequest(n) if start is None else RangeByteRequest(start, start + n)
            async with limit:
                got = await self.store.get(self._key(sidx), prototype=prototype, byte_range=rng)
            return None if got is None else got.to_bytes()

        async def all_of() -> list[bytes | None]:
            return list(await asyncio.gather(*(one(*r) for r in requests)))

        return sync(all_of())

    def _indexes_of(self, sidxs: set[tuple[int, ...]]) -> dict[tuple[int, ...], np.ndarray | None]:
        """The index of each shard (None: no such shard): cached ones, the others fetched at once."""
        todo = list(sidxs)
        got = self._index_cache.load_many(todo, lambda mine: self._fetch_indexes([todo[n] for n in mine]))
        return {sidx: None if index.size == 0 else index for sidx, index in zip(todo, got, strict=True)}

    def _fetch_indexes(self, sidxs: list[tuple[int, ...]]) -> Iterator[np.ndarray]:
        """The indexes of these shards, fetched together (an empty one where the shard does not exist)."""
        start = None if self.index_at_end else 0  # None: the last index_bytes bytes
        for sidx, got in zip(sidxs, self._get([(sidx, start, self.index_bytes) for sidx in sidxs]), strict=True):
            if got is None:
                yield np.empty((0, 2), "<u8")
            elif len(got) != self.index_bytes:
                raise CorruptShardError(f"{self.shard_path(sidx)}: asked for its {self.index_bytes}-byte shard "
                                        f"index, got {len(got)} bytes (a short file, or a server ignoring Range)")
            else:
                yield self._parse_index(sidx, got)

    def chunks(self, cidxs: Sequence[tuple[int, ...]], *, scratch: bool = False,
               buffer: Callable[[int], np.ndarray] | None = None) -> Iterator[np.ndarray]:
        cidxs = list(cidxs)
        sidxs = [tuple(i // p for i, p in zip(cidx, self.per_shard, strict=True)) for cidx in cidxs]
        indexes = self._indexes_of(set(sidxs))
        spans: list[tuple[tuple[int, ...], int, int] | None] = []  # per chunk: (shard, offset, length) or None
        for cidx, sidx in zip(cidxs, sidxs, strict=True):
            index = indexes[sidx]
            if index is None:
                spans.append(None)
                continue
            stored = self._span(cidx, index)
            if stored is None:
                spans.append(None)
                continue
            offset, nbytes = stored
            if not 16 <= nbytes <= self.max_stored or offset >= 2**62:
                raise CorruptShardError(f"{self.shard_path(sidx)}: its index puts chunk {cidx} at {offset}+{nbytes}; "
                                        f"a chunk takes 16 to {self.max_stored} bytes")
            spans.append((sidx, offset, nbytes))
        # Adjacent chunks of one shard in one request (at most MERGE_BYTES), then every request at once.
        order = sorted((s for s in set(spans) if s is not None))
        merged: list[list[Any]] = []  # [shard, start, length, [spans]]
        for span in order:
            sidx, offset, nbytes = span
            last = merged[-1] if merged else None
            if (last is not None and last[0] == sidx and last[1] + last[2] == offset
                    and last[2] + nbytes <= self.MERGE_BYTES):
                last[2] += nbytes
                last[3].append(span)
            else:
                merged.append([sidx, offset, nbytes, [span]])
        got = self._get([(sidx, start, n) for sidx, start, n, _ in merged]) if merged else []
        data: dict[tuple[tuple[int, ...], int, int], memoryview] = {}
        for (sidx, start, n, parts), body in zip(merged, got, strict=True):
            if body is None or len(body) != n:
                raise CorruptShardError(
                    f"{self.shard_path(sidx)}: asked for bytes {start}..{start + n}, got "
                    f"{'no file' if body is None else f'{len(body)} bytes'} (changed, short, or a server ignoring Range)")
            view = memoryview(body)
            for span in parts:
                data[span] = view[span[1] - start:span[1] - start + span[2]]
        with self._lock:
            self.chunk_reads += len(data)
        for cidx, where in zip(cidxs, spans, strict=True):
            if where is None:
                yield self._fill()
            else:
                yield self._decode(data[where], where[0], cidx, where[1], scratch, buffer)
