"""Write block predictions into a new OME-Zarr with the source geometry: blended, resumable, multi-writer safe."""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from numcodecs import Blosc

from emdata import ngff
from emdata.access.grid import Block, BlockGrid
from emdata.access.spec import Box
from emdata.errors import InvalidParameterError
from emdata.ngff import Downsampling, create_image_group, write_pyramid

Blend = Literal["none", "average", "smooth"]
BLENDS: tuple[str, ...] = ("none", "average", "smooth")
_CODEC = Blosc(cname="lz4", clevel=1, shuffle=Blosc.SHUFFLE)
_FORMAT = 1


def blend_window(shape: tuple[int, ...], blend: str) -> np.ndarray:
    """Per-voxel weights of one block: all ones (``average``) or a separable sine taper (``smooth``).

    The taper is positive everywhere, so voxels that only one block covers (array borders) keep its value.
    """
    if blend != "smooth":
        return np.ones(shape, np.float32)
    w = np.ones((1, 1, 1), np.float32)
    for axis, n in enumerate(shape):
        profile = np.sin(np.pi * (np.arange(n) + 0.5) / n).astype(np.float32)
        w = w * profile.reshape([n if a == axis else 1 for a in range(3)])
    return w


def crop_prediction(block: Block, prediction: np.ndarray) -> np.ndarray:
    """``prediction`` as the block box: a read-box-shaped prediction loses its halo; other shapes raise."""
    prediction = np.asarray(prediction)
    if prediction.shape == block.read_box.shape and block.read_box != block.block_box:
        prediction = prediction[block.block_in_read]
    if prediction.shape != block.block_box.shape:
        raise InvalidParameterError(
            f"prediction shape {prediction.shape} matches neither the block box {block.block_box.shape} "
            f"nor the read box {block.read_box.shape} (z, y, x) of block {block.index}")
    return prediction


def block_contribution(block: Block, prediction: np.ndarray, blend: str, bounds: Box,
                       acc_dtype: np.dtype) -> tuple[Box, np.ndarray, np.ndarray | None]:
    """What one block adds to the output: the region, its (weighted) values and weights (None: ``blend="none"``,
    the core's values replace). ``prediction`` is block-box shaped. Both writers use exactly this."""
    if blend == "none":
        return block.core_box, prediction[block.core_box.relative_to(block.block_box)], None
    region = block.block_box.intersect(bounds)
    assert region is not None
    inside = region.relative_to(block.block_box)
    weights = blend_window(block.block_box.shape, blend)[inside]
    return region, prediction[inside].astype(acc_dtype) * weights, weights


def add_contribution(acc: np.ndarray, wsum: np.ndarray, acc_box: Box, region: Box, values: np.ndarray,
                     weights: np.ndarray | None) -> None:
    """Add a block's contribution (``block_contribution``) to accumulators that hold ``acc_box``."""
    part = region.intersect(acc_box)
    if part is None:
        return
    src, dst = part.relative_to(region), part.relative_to(acc_box)
    if weights is None:
        acc[dst] = values[src]
        wsum[dst] = 1.0
    else:
        acc[dst] += values[src]
        wsum[dst] += weights[src]


def resolve_blend(acc: np.ndarray, wsum: np.ndarray, fill: np.ndarray, blend: str, dtype: np.dtype) -> np.ndarray:
    """The output values: sum / weight where covered (rounded and clipped for integer outputs), else ``fill``."""
    covered = wsum > 0
    if blend == "none":
        return np.where(covered, acc, fill)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = acc / np.where(covered, wsum, 1)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        mean = np.clip(np.rint(mean), info.min, info.max)
    return np.where(covered, mean.astype(dtype), fill)


def accumulator_dtype(dtype: np.dtype, blend: str) -> np.dtype:
    if blend == "none":
        return dtype
    return np.dtype(np.float64 if dtype == np.float64 else np.float32)


def output_shards(array: Any) -> tuple[int, ...]:
    """The shards of an output written from ``array``'s blocks: ``array``'s, at most ``ngff.DEFAULT_SHARDS`` (256^3)
    per axis, on whole chunks. Writing a shard holds a weighted sum and weights for each of its voxels (8 bytes
    per voxel: 128 MiB for 256^3); the stages' 64 MiB uint8 input shards (256 x 512 x 512) would make it 512 MiB."""
    shards = array.shards or array.chunks
    return tuple(int(s) if s <= d else max(int(c), d // int(c) * int(c))
                 for s, c, d in zip(shards, array.chunks, ngff.DEFAULT_SHARDS, strict=True))


def shard_boxes(shape: tuple[int, ...], shards: tuple[int, ...]) -> list[Box]:
    """The output's shards as voxel boxes, z-major (the last ones clipped to the array)."""
    return list(_grid_boxes(shape, shards))


class BlockWriter:
    """Accumulate predictions of ``grid``'s blocks, then ``finalize()`` into ``out_path`` (OME-Zarr 0.5).

    The output has the grid array's shape, voxel size, translation and chunks, and its shards up to 256^3
    (``output_shards``). ``blend="none"``
    writes each block's core (crop-and-stitch); ``average`` and ``smooth`` weight every block-box voxel
    (uniform or sine window) and divide the weighted sum by the summed weights.

    Predictions accumulate in ``<out_path>.partial/``: one file per storage chunk holding the weighted sum,
    the weights and the keys of the blocks already added. Each chunk is updated under an exclusive file lock
    and replaced atomically, and a block is added to a chunk only if its key is not there yet, so writers on
    any set of blocks (disjoint or sharing chunks and shards) never lose or double an update, and a re-run
    after a crash skips what was written. ``finalize`` writes each output shard whole, from one worker.
    """

    def __init__(
        self,
        out_path: str | os.PathLike[str],
        grid: BlockGrid,
        *,
        dtype: Any = np.float32,
        blend: Blend = "average",
        name: str = "prediction",
        n_levels: int = 1,
        downsampling: Downsampling = "mean",
        fill_value: float = 0,
    ) -> None:
        if blend not in BLENDS:
            raise InvalidParameterError(f"blend must be one of {BLENDS}, got {blend!r}")
        self.out_path = Path(out_path)
        self.partial = self.out_path.with_name(self.out_path.name + ".partial")
        self.grid = grid
        self.array = grid.array
        self.dtype = np.dtype(dtype)
        self.blend = blend
        self.name = name
        self.n_levels = n_levels
        self.downsampling = downsampling
        self.fill_value = fill_value
        self.chunks = self.array.chunks
        self.shards = output_shards(self.array)
        self.acc_dtype = accumulator_dtype(self.dtype, blend)
        self._meta = {
            "format": _FORMAT, "shape": list(self.array.shape), "dtype": self.dtype.str, "blend": blend,
            "spec": grid.spec.to_dict(), "level": self.array.level, "chunks": list(self.chunks),
            "voxel_size_nm": list(self.array.voxel_size_nm), "translation_nm": list(self.array.translation_nm),
        }
        self._open_or_create()

    # -- setup ---------------------------------------------------------------------------------------------
    def _open_or_create(self) -> None:
        self.partial.mkdir(parents=True, exist_ok=True)
        with _locked(self.partial / "create.lock"):
            meta_path = self.partial / "meta.json"
            if meta_path.exists():
                found = json.loads(meta_path.read_text())
                if found != self._meta:
                    raise InvalidParameterError(
                        f"{self.partial} holds an unfinished write with different settings {found}; "
                        f"expected {self._meta}. Remove it or use another out_path")
                return
            for sub in ("chunks", "locks", "done", "final"):
                (self.partial / sub).mkdir(exist_ok=True)
            _atomic_write(meta_path, json.dumps(self._meta, indent=1).encode())

    # -- block records -------------------------------------------------------------------------------------
    def _done_marker(self, block: Block) -> Path:
        return self.partial / "done" / block.block_box.key()

    def is_done(self, block: Block) -> bool:
        return self._done_marker(block).exists()

    def pending(self, indices: list[int] | None = None) -> list[int]:
        """Flat grid indices (of all, or of ``indices``) whose blocks are not written yet."""
        candidates = range(len(self.grid)) if indices is None else indices
        return [i for i in candidates if not self.is_done(self.grid.block_at(i))]

    # -- writing -------------------------------------------------------------------------------------------
    def write(self, block: Block, prediction: np.ndarray) -> bool:
        """Add one block's prediction (z, y, x), shaped like its block box or its read box (halo is cropped).

        Returns False if the block was already written (nothing changes), True otherwise.
        """
        prediction = crop_prediction(block, prediction)
        if self.is_done(block):
            return False
        key = block.block_box.key()
        region, values, weights = block_contribution(block, prediction, self.blend, self.array.bounds,
                                                     self.acc_dtype)
        for cbox in self._chunk_boxes(region):
            part = cbox.intersect(region)
            assert part is not None
            self._add(cbox, part, key, values[part.relative_to(region)],
                      None if weights is None else weights[part.relative_to(region)])
        _atomic_write(self._done_marker(block), b"")
        return True

    def _chunk_boxes(self, region: Box) -> Iterator[Box]:
        ranges = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(region.start, region.stop, self.chunks, strict=True)]
        for cidx in itertools.product(*ranges):
            yield Box(tuple(i * c for i, c in zip(cidx, self.chunks, strict=True)),  # type: ignore[arg-type]
                      tuple(min((i + 1) * c, n) for i, c, n in zip(cidx, self.chunks, self.array.shape, strict=True)))  # type: ignore[arg-type]

    def _chunk_file(self, cbox: Box) -> Path:
        return self.partial / "chunks" / (cbox.key() + ".npz")

    def _add(self, cbox: Box, part: Box, key: str, values: np.ndarray, weights: np.ndarray | None) -> None:
        path = self._chunk_file(cbox)
        with _locked(self.partial / "locks" / (cbox.key() + ".lock")):
            acc, wsum, keys = _load_chunk(path, cbox.shape, self.acc_dtype)
            if key in keys:
                return  # this block reached this chunk before a crash: adding again would double it
            add_contribution(acc, wsum, cbox, part, values, weights)
            _save_chunk(path, acc, wsum, [*keys, key])

    # -- finalize ------------------------------------------------------------------------------------------
    def finalize(self, *, worker: int = 0, n_workers: int = 1, allow_incomplete: bool = False) -> Path:
        """Write the output shards of this ``worker`` (round robin over ``n_workers``); returns ``out_path``.

        Each shard is written whole by exactly one worker, so workers never share a shard file. Worker 0
        of a single-worker run (or ``build_pyramid()`` after all workers) fills pyramid levels 1...
        """
        if not allow_incomplete:
            missing = self.pending()
            if missing:
                raise InvalidParameterError(
                    f"{len(missing)} of {len(self.grid)} blocks are not written yet (e.g. flat index {missing[0]}); "
                    f"write them or pass allow_incomplete=True")
        out = self._output_array()
        boxes = shard_boxes(self.array.shape, self.shards)
        for i, sbox in enumerate(boxes):
            if i % n_workers != worker:
                continue
            marker = self.partial / "final" / sbox.key()
            if marker.exists():
                continue
            data = np.full(sbox.shape, self.fill_value, dtype=self.dtype)
            for cbox in self._chunk_boxes(sbox):
                path = self._chunk_file(cbox)
                if not path.exists():
                    continue
                acc, wsum, _ = _load_chunk(path, cbox.shape, self.acc_dtype)
                data[cbox.relative_to(sbox)] = self._resolve(acc, wsum, data[cbox.relative_to(sbox)])
            out[sbox.slices] = data
            _atomic_write(marker, b"")
        if n_workers == 1 and self.n_levels > 1:
            self.build_pyramid()
        return self.out_path

    def _resolve(self, acc: np.ndarray, wsum: np.ndarray, fill: np.ndarray) -> np.ndarray:
        return resolve_blend(acc, wsum, fill, self.blend, self.dtype)

    def _output_array(self) -> zarr.Array:
        with _locked(self.partial / "create.lock"):
            if not (self.partial / "output_created").exists():
                create_image_group(
                    self.out_path, name=self.name, shape=self.array.shape, dtype=self.dtype,
                    geometry=self.array.geometry, n_levels=self.n_levels, chunks=self.chunks,
                    shards=self.shards, downsampling=self.downsampling)
                _atomic_write(self.partial / "output_created", b"")
        return zarr.open_array(str(self.out_path / "0"), mode="r+", zarr_format=3)

    def build_pyramid(self) -> None:
        """Fill levels 1.. from level 0 (run once, after every worker's ``finalize``)."""
        root = zarr.open_group(str(self.out_path), mode="r+", zarr_format=3)
        write_pyramid([root[str(i)] for i in range(self.n_levels)], self.downsampling)  # type: ignore[misc]

    def cleanup(self) -> None:
        """Remove the accumulation sidecar (after every worker has finalized)."""
        shutil.rmtree(self.partial, ignore_errors=True)


def _grid_boxes(shape: tuple[int, ...], step: tuple[int, ...]) -> Iterator[Box]:
    for start in itertools.product(*(range(0, n, s) for n, s in zip(shape, step, strict=True))):
        yield Box(start, tuple(min(a + s, n) for a, s, n in zip(start, step, shape, strict=True)))  # type: ignore[arg-type]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive POSIX advisory lock (processes and threads alike: each call opens its own descriptor)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_chunk(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if not path.exists():
        return np.zeros(shape, dtype), np.zeros(shape, np.float32), []
    with np.load(path, allow_pickle=False) as f:
        acc = np.frombuffer(_CODEC.decode(f["acc"].tobytes()), dtype=dtype).reshape(shape).copy()
        wsum = np.frombuffer(_CODEC.decode(f["weight"].tobytes()), dtype=np.float32).reshape(shape).copy()
        keys = [str(k) for k in f["keys"]]
    return acc, wsum, keys


def _save_chunk(path: Path, acc: np.ndarray, wsum: np.ndarray, keys: list[str]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, acc=np.frombuffer(_CODEC.encode(np.ascontiguousarray(acc)), np.uint8),
                     weight=np.frombuffer(_CODEC.encode(np.ascontiguousarray(wsum, np.float32)), np.uint8),
                     keys=np.array(keys, dtype=str))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
