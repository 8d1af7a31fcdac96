"""Grid iteration: cut an ROI into blocks whose cores cover every voxel exactly once, with halo and prefetch."""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from emdata.access.open import EmArray, pad_source
from emdata.access.spec import AXES, PAD_MODES, BlockSpec, Box, RoiNm, box_to_nm
from emdata.errors import InvalidParameterError
from emdata.shards import decode_threads

# Blocks of at most this many storage chunks are read by the decoding threads alone (``BlockGrid._direct_blocks``).
_DIRECT_MAX_CHUNKS = 16
# Blocks in flight when the shards are remote (each block waits on the network, not on the cores), at most
# REMOTE_PREFETCH_BYTES of them: measured with bench/bench_access.py --suite remote (DATA_ACCESS_DESIGN.md,
# "Remote reads").
REMOTE_PREFETCH = 8
REMOTE_PREFETCH_BYTES = 256 * 2**20

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class AxisBlock:
    """One block along one axis: the block itself, the part it owns (core) and what is read (block + halo)."""

    block: tuple[int, int]
    core: tuple[int, int]
    read: tuple[int, int]


def axis_blocks(
    *, roi: tuple[int, int], size: int, block: int, overlap: int, halo: int, border: str, axis: str = "?"
) -> list[AxisBlock]:
    """Blocks along one axis of length ``size`` covering ``roi`` = [start, stop).

    Blocks start every ``block - overlap`` voxels from the ROI start. The core of each block runs from the
    middle of its overlap with the previous block to the middle of its overlap with the next one (the ROI
    ends for the first and last block), so cores partition the covered range. In ``drop`` mode the covered
    range is the ROI minus the voxels closer than ``halo`` to the array border, and the last block is moved
    back to end on it, so that every block and its halo lie inside the array.
    """
    r0, r1 = roi
    stride = block - overlap
    if border == "drop":
        r0, r1 = max(r0, halo), min(r1, size - halo)
        if r1 - r0 < block:
            raise InvalidParameterError(
                f"block_shape_voxels {block} with halo_voxels {halo} along axis {axis} does not fit in drop mode: "
                f"the array has {size} voxels and the ROI leaves only {max(r1 - r0, 0)} voxels with a full halo; "
                f"use a smaller block or halo, or a pad or shrink border"
            )
    length = r1 - r0
    count = max(1, math.ceil((length - overlap) / stride))
    starts = [r0 + j * stride for j in range(count)]
    if border == "drop":
        starts[-1] = r1 - block
    out = []
    for j, st in enumerate(starts):
        core_start = r0 if j == 0 else r0 + j * stride + overlap // 2
        core_stop = r1 if j == count - 1 else r0 + (j + 1) * stride + overlap // 2
        stop = st + block
        if border == "shrink":
            stop = min(stop, r1)
            read = (max(st - halo, 0), min(stop + halo, size))
        else:
            read = (st - halo, stop + halo)
        out.append(AxisBlock(block=(st, stop), core=(core_start, core_stop), read=read))
    return out


@dataclass(frozen=True)
class Block:
    """One block of a grid or sampler: ``data`` (z, y, x) covers ``read_box``; boxes are voxels of ``level``.

    ``block_box`` is the block without halo, ``core_box`` the voxels it owns in the grid's partition of the
    ROI. Physical placement: voxel i of an axis is centred at ``translation_nm + i * voxel_size_nm``.
    """

    index: tuple[int, ...]
    read_box: Box
    block_box: Box
    core_box: Box
    level: int
    voxel_size_nm: tuple[float, float, float]
    translation_nm: tuple[float, float, float]
    data: np.ndarray | None = None

    @property
    def core_in_read(self) -> tuple[slice, slice, slice]:
        """Slices of ``data`` that hold the core."""
        return self.core_box.relative_to(self.read_box)

    @property
    def block_in_read(self) -> tuple[slice, slice, slice]:
        """Slices of ``data`` that hold the block without its halo."""
        return self.block_box.relative_to(self.read_box)

    def core(self) -> np.ndarray:
        assert self.data is not None
        return self.data[self.core_in_read]

    @property
    def read_origin_nm(self) -> tuple[float, float, float]:
        """Physical centre (nm, z, y, x) of ``data[0, 0, 0]``."""
        return tuple(t + a * v for a, t, v in zip(self.read_box.start, self.translation_nm, self.voxel_size_nm, strict=True))  # type: ignore[return-value]

    @property
    def core_nm(self) -> RoiNm | None:
        """Physical extent (voxel edges, nm) of the core."""
        return box_to_nm(self.core_box, self.voxel_size_nm, self.translation_nm)

    def with_data(self, data: np.ndarray) -> Block:
        return Block(self.index, self.read_box, self.block_box, self.core_box, self.level,
                     self.voxel_size_nm, self.translation_nm, data)


def resolve_roi(array: EmArray, spec: BlockSpec) -> Box:
    """The spec's ROI in voxels of ``array`` (the whole array if none); it must lie inside the array."""
    if spec.roi_nm is not None:
        roi = array.roi_to_voxels(spec.roi_nm)
        what = f"roi_nm {spec.roi_nm.start_nm}..{spec.roi_nm.stop_nm} (voxels {roi.start}..{roi.stop})"
    elif spec.roi_voxels is not None:
        roi = spec.roi_voxels
        what = f"roi_voxels {roi.start}..{roi.stop}"
    else:
        return array.bounds
    if roi.size == 0 or not array.bounds.contains(roi):
        raise InvalidParameterError(
            f"{what} is outside the array: level {array.level} has shape {array.shape} (z, y, x), "
            f"i.e. voxels (0, 0, 0)..{array.shape}"
        )
    return roi


class BlockGrid:
    """Regular blocks over an ROI of one array level, in C order (z slowest); ``len``, index and iterate.

    Every voxel of ``covered_box`` (the ROI; in drop mode the ROI minus the border without full halo)
    belongs to exactly one block's core. Iteration reads the blocks in a background thread pool, up to
    ``prefetch`` blocks ahead; the array's chunk cache makes overlapping reads decode each chunk once.
    ``release_chunks``: whether iterating over all blocks, or some in increasing order (``writer.pending()``,
    ``shard(rank, n)``), drops each decoded chunk from the cache once no later block reads it, so that the cache
    holds the chunks ahead instead of those behind: chunks of local shards (whose memory then serves the next
    decodes) and of remote data read through zarr-python; tensorstore's pool keeps its own. Default (None):
    when the chunks the pass reads do not all fit in the cache (a pass over a volume that fits leaves it
    cached for the next pass); True: always; False: never.
    When no two blocks share a chunk and the array is read from local shards, the blocks' chunks are all
    decoded on the process's decoding threads. Blocks of at most 16 chunks are decoded straight into them
    from the iterating thread (a reading thread's hand-off per block costs more than it saves there:
    measured on 2 cores, 128^3 blocks of 64^3 chunks, 1.07x the reading threads), ``prefetch=None``
    (default) 2 blocks ahead (1 ahead measured 0.98-1.0x of that); larger blocks go through reading
    threads, as many as cores (2 to 4) ahead (256^3 blocks: 0.95x directly). Remote shards: 8 blocks ahead in
    reading threads (at most 256 MiB of them), each fetching and decoding its own chunks. Otherwise blocks are
    read in a thread pool, default 4 ahead (halo and overlap blocks are assembled in the reading threads, and remote
    reads wait on the network: more in flight helps).
    """

    def __init__(self, array: EmArray, spec: BlockSpec, *, prefetch: int | None = None,
                 release_chunks: bool | None = None) -> None:
        if spec.level is not None and spec.level != array.level:
            if spec.level >= array.n_levels:
                raise InvalidParameterError(
                    f"scale level {spec.level} does not exist: levels 0..{array.n_levels - 1} are available")
            array = array.at_level(spec.level)
        if prefetch is not None and (isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0):
            raise InvalidParameterError(f"prefetch must be an int >= 0 or None, got {prefetch!r}")
        if release_chunks not in (None, True, False):
            raise InvalidParameterError(f"release_chunks must be None, True or False, got {release_chunks!r}")
        self.array = array
        self.spec = spec
        self.roi = resolve_roi(array, spec)
        self._axes = [
            axis_blocks(roi=(a, b), size=n, block=bs, overlap=o, halo=h, border=spec.border, axis=ax)
            for a, b, n, bs, o, h, ax in zip(self.roi.start, self.roi.stop, array.shape, spec.block_shape_voxels,
                                             spec.overlap_voxels, spec.halo_voxels, AXES, strict=True)
        ]
        self.covered_box = Box(tuple(ax[0].core[0] for ax in self._axes),  # type: ignore[arg-type]
                               tuple(ax[-1].core[1] for ax in self._axes))  # type: ignore[arg-type]
        self._keep = self.blocks_share_chunks
        if prefetch is None:
            if self._direct_blocks:
                prefetch = 2
            elif array._direct is not None and array._direct.remote:
                block_bytes = math.prod(spec.read_shape_voxels) * array.dtype.itemsize
                prefetch = max(2, min(REMOTE_PREFETCH, REMOTE_PREFETCH_BYTES // max(block_bytes, 1)))
            elif not self._keep and array._direct is not None:
                prefetch = min(4, max(2, decode_threads()))
            else:
                prefetch = 4
        self.prefetch: int = prefetch
        self.release_chunks = release_chunks

    @property
    def is_chunk_aligned(self) -> bool:
        """Whether block boundaries (without halo) fall on storage chunk boundaries on every axis.

        True when the ROI start and the stride are chunk multiples (drop mode's shifted last block and
        the array end aside). Misaligned blocks decode nothing extra (chunks are cached) but copy more.
        """
        return all(a % c == 0 and s % c == 0 for a, s, c in zip(
            self.roi.start, self.spec.stride_voxels, self.array.chunks, strict=True))

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        return tuple(len(ax) for ax in self._axes)  # type: ignore[return-value]

    def __len__(self) -> int:
        return math.prod(self.grid_shape)

    def block_at(self, index: int | Sequence[int]) -> Block:
        """The block (without data) at a flat index or a (z, y, x) grid index."""
        gidx = self._grid_index(index)
        parts = [ax[i] for ax, i in zip(self._axes, gidx, strict=True)]
        return Block(
            index=gidx,
            read_box=Box(tuple(p.read[0] for p in parts), tuple(p.read[1] for p in parts)),  # type: ignore[arg-type]
            block_box=Box(tuple(p.block[0] for p in parts), tuple(p.block[1] for p in parts)),  # type: ignore[arg-type]
            core_box=Box(tuple(p.core[0] for p in parts), tuple(p.core[1] for p in parts)),  # type: ignore[arg-type]
            level=self.array.level, voxel_size_nm=self.array.voxel_size_nm,
            translation_nm=self.array.translation_nm,
        )

    def blocks(self) -> Iterator[Block]:
        """All blocks, without reading data."""
        for gidx in itertools.product(*(range(len(ax)) for ax in self._axes)):
            yield self.block_at(gidx)

    @property
    def blocks_share_chunks(self) -> bool:
        """Whether two blocks' read boxes can meet the same storage chunk (then decoded chunks are kept).

        Not when blocks are chunk-aligned, without halo or overlap, and at least a chunk apart (drop mode
        moves the last block back, so it may share): every chunk then serves one block only.
        """
        spec = self.spec
        return not (self.is_chunk_aligned and spec.border != "drop" and not any(spec.halo_voxels)
                    and not any(spec.overlap_voxels))

    def read(self, block: Block) -> Block:
        return block.with_data(read_block(self.array, block.read_box, self.spec, keep_chunks=self._keep))

    def __getitem__(self, index: int | Sequence[int]) -> Block:
        return self.read(self.block_at(index))

    def __iter__(self) -> Iterator[Block]:
        return self.iter_blocks()

    def iter_blocks(self, indices: Iterable[int | Sequence[int]] | None = None) -> Iterator[Block]:
        """Read blocks (all, or the given flat or (z, y, x) indices) in order, ``prefetch`` of them ahead in threads.
        Every index is checked before any block is read."""
        picked = None if indices is None else [self._grid_index(i) for i in indices]  # (z, y, x)
        todo = (self.block_at(i) for i in picked) if picked is not None else self.blocks()
        if self._direct_blocks and self.prefetch > 0:
            yield from self._iter_direct(todo)
        elif (self._keep and self.release_chunks is not False and self.array.chunks_in_lru
              and (picked is None or all(a < b for a, b in zip(picked, picked[1:])))):  # C order
            last = self._last_reads()
            chunks_read = math.prod(sum(map(len, axis.values())) for axis in last)
            reads = chunks_read * math.prod(self.array.chunks) * self.array.dtype.itemsize
            blocks = prefetched(todo, self.read, self.prefetch)
            yield from (self._releasing(blocks, last) if self.release_chunks or reads > self.array.cache.total_bytes
                        else blocks)
        else:
            yield from prefetched(todo, self.read, self.prefetch)

    def _last_reads(self) -> list[dict[int, list[int]]]:
        """Per axis: block index -> the chunk indices (along that axis) that no later block along it reads (the
        chunks the blocks read along it, each listed once)."""
        mode = self.spec.border if self.spec.border in PAD_MODES else "constant"  # drop, shrink: inside
        out = []
        for axis, n, c in zip(self._axes, self.array.shape, self.array.chunks, strict=True):
            last: dict[int, int] = {}
            for b, ab in enumerate(axis):
                start, stop = pad_source(ab.read[0], ab.read[1], n, mode)
                for i in range(start // c, -(-stop // c)):
                    last[i] = b
            by_block: dict[int, list[int]] = {}
            for i, b in last.items():
                by_block.setdefault(b, []).append(i)
            out.append(by_block)
        return out

    def _releasing(self, blocks: Iterator[Block], last: list[dict[int, list[int]]]) -> Iterator[Block]:
        """The blocks, in C order (all, or some in increasing order); once one is read, the chunks that no later
        block of the grid reads leave the cache, and the rest when the pass is over.

        The blocks reading chunk (i, j, k) are those whose z, y and x ranges meet it, so the last of them in C
        order is (the last along z, the last along y, the last along x), and every block before it in the pass
        has been read when it has (the reads finish in order). A chunk dropped too early would only be decoded
        again; its memory is reused only once no view of it is left (``ChunkCache.buffer``)."""
        lz, ly, lx = last

        def release(upto: int) -> None:  # the chunks last read by the blocks after ``done`` up to ``upto``
            chunks = []
            for flat in range(done + 1, upto + 1):
                z, y, x = self._grid_index(flat)
                chunks += [(i, j, k) for i in lz.get(z, ()) for j in ly.get(y, ()) for k in lx.get(x, ())]
            if chunks:
                self.array.release_chunks(chunks)

        done = -1
        for block in blocks:
            flat = int(np.ravel_multi_index(block.index, self.grid_shape))
            release(flat)
            done = flat
            yield block
        release(len(self) - 1)

    @property
    def _direct_blocks(self) -> bool:
        """Blocks that share no chunk, of few chunks, read from local shards: decoded straight into them on the
        decoding threads, without reading threads (whose hand-off per block matters when a block has few chunks:
        measured on 2 cores, 128^3 blocks of 8 chunks 1.07x the reading threads, 256^3 of 64 chunks 0.95x)."""
        return (not self._keep and self.array._direct is not None and not self.array._direct.remote
                and math.prod(-(-b // c) for b, c in zip(self.spec.read_shape_voxels, self.array.chunks, strict=True))
                <= _DIRECT_MAX_CHUNKS)

    def _iter_direct(self, blocks: Iterator[Block]) -> Iterator[Block]:
        """``prefetch`` blocks ahead, each block's chunks decoded into it on the decoding threads in groups started
        from this thread, no reading thread in between. A block that needs padding (it reaches past the array)
        is read here when its turn comes."""
        array = self.array
        pending: deque[tuple[Block, np.ndarray | None, list[Future[None]]]] = deque()
        # Up to prefetch + 1 blocks are in flight: each is cut into as many groups as keep every decoding thread
        # busy, no more (a group is a hand-off to a thread and back; on 2 cores one group per block: its main
        # thread's CPU per 128^3 pass of 512^3 15 -> 12 ms, the pass 1.8% faster, bench/bench_access.py).
        groups = -(-decode_threads() // (self.prefetch + 1))

        def finish(block: Block, out: np.ndarray | None, futures: list[Future[None]]) -> Block:
            for future in futures:
                future.result()
            return self.read(block) if out is None else block.with_data(out)  # None: a padded block, read now

        try:
            for block in blocks:
                if array.bounds.contains(block.read_box):
                    out = np.empty(block.read_box.shape, array.dtype)
                    pending.append((block, out, array._submit_direct(block.read_box, out, groups)))
                else:
                    pending.append((block, None, []))
                while len(pending) > self.prefetch:
                    yield finish(*pending.popleft())
            while pending:
                yield finish(*pending.popleft())
        finally:
            for _, _, futures in pending:  # left early: nothing more is started; running groups finish
                for future in futures:
                    future.cancel()

    def blocks_touching(self, box: Box, part: str = "block") -> list[int]:
        """Flat indices (ascending) of the blocks whose ``part`` (``"block"`` or ``"core"`` box) meets ``box``.

        The shard-owning writers use it: the blocks whose predictions land in one output shard.
        """
        if part not in ("block", "core"):
            raise InvalidParameterError(f"part must be 'block' or 'core', got {part!r}")
        per_axis = []
        for ax, a, b in zip(self._axes, box.start, box.stop, strict=True):
            spans = [blk.block if part == "block" else blk.core for blk in ax]
            per_axis.append([j for j, (lo, hi) in enumerate(spans) if lo < b and a < hi])
        shape = self.grid_shape
        return [int(np.ravel_multi_index(g, shape)) for g in itertools.product(*per_axis)]

    def shard(self, rank: int, world_size: int) -> list[int]:
        """Flat block indices for worker ``rank`` of ``world_size`` (round robin, disjoint, complete)."""
        if not (0 <= rank < world_size):
            raise InvalidParameterError(f"rank must be in 0..{world_size - 1}, got {rank!r}")
        return list(range(rank, len(self), world_size))

    def _grid_index(self, index: int | Sequence[int]) -> tuple[int, int, int]:
        shape = self.grid_shape
        if isinstance(index, (int, np.integer)):
            n = len(self)
            i = int(index) + n if index < 0 else int(index)
            if not 0 <= i < n:
                raise IndexError(f"block index {index} out of range for {n} blocks")
            return tuple(int(v) for v in np.unravel_index(i, shape))  # type: ignore[return-value]
        gidx = tuple(int(i) for i in index)
        if len(gidx) != 3 or any(not 0 <= i < s for i, s in zip(gidx, shape, strict=True)):
            raise IndexError(f"grid index {gidx} out of range for grid shape {shape} (z, y, x)")
        return gidx  # type: ignore[return-value]


def read_block(array: EmArray, read_box: Box, spec: BlockSpec, *, keep_chunks: bool = True) -> np.ndarray:
    if spec.border in PAD_MODES:
        return array.read_padded(read_box, spec.border, spec.constant_value, keep_chunks=keep_chunks)
    return array.read(read_box, keep_chunks=keep_chunks)


def prefetched(items: Iterator[T], read: Callable[[T], R], depth: int) -> Iterator[R]:
    """Apply ``read`` to each item, keeping up to ``depth`` reads in flight in a thread pool, in order."""
    if depth == 0:
        for item in items:
            yield read(item)
        return
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="emdata-prefetch") as pool:
        try:
            for item in items:
                pending.append(pool.submit(read, item))
                if len(pending) > depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()
