"""Map a function over a volume's blocks on a dask.distributed cluster; each task writes whole output shards, no locks.

``map_blocks(fn, grid, out, client=client)`` makes one task per output shard. The task reads every block of
``grid`` whose prediction lands in its shard (with halo, as the grid says), applies ``fn``, blends the
overlaps in memory exactly as ``BlockWriter`` does (same window, same order of additions, same division),
and writes the shard in one put. No two tasks write the same object, so the output can be a local path or
an ``s3://`` URL (object stores hold no locks). A block that reaches several shards is computed by each of
their tasks: that recomputation is the price of needing no shared state. Finished shards leave a marker
under ``<out>.emdata-done/``; a re-run skips them, and refuses to resume with other settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import zarr

from emdata.access.grid import BlockGrid
from emdata.access.spec import Box
from emdata.access.writer import (
    BLENDS,
    Blend,
    accumulator_dtype,
    add_contribution,
    block_contribution,
    crop_prediction,
    output_shards,
    resolve_blend,
    shard_boxes,
)
from emdata.errors import InvalidParameterError
from emdata.ngff import Downsampling, create_multiscale, write_pyramid

_FORMAT = 1


@dataclass(frozen=True)
class MapResult:
    """What a ``map_blocks`` run did: shards written now, shards skipped (done before), blocks computed."""

    out: str
    shards_written: int
    shards_skipped: int
    blocks_computed: int
    n_blocks: int
    seconds: float


@dataclass(frozen=True)
class _Target:
    """The output: a local path or URL, its fsspec options, and the settings every task needs."""

    out: str
    storage_options: dict[str, Any]
    dtype: str
    blend: str
    fill_value: float

    @property
    def done_dir(self) -> str:
        return self.out.rstrip("/") + ".emdata-done"

    def fs(self) -> tuple[Any, str]:
        fs, path = fsspec.core.url_to_fs(self.done_dir, **self.storage_options)
        return fs, path

    def store(self) -> Any:
        if "://" not in self.out:
            return self.out
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(self.out, storage_options=dict(self.storage_options), read_only=False)


def _marker(sbox: Box) -> str:
    return sbox.key()


def render_shard(fn: Callable[..., Any], grid: BlockGrid, target: _Target, sbox: Box, pass_block: bool) -> int:
    """Compute, blend and write one output shard; returns the blocks computed (-1: done before, skipped)."""
    fs, done = target.fs()
    marker = f"{done}/{_marker(sbox)}"
    if fs.exists(marker):
        return -1
    dtype = np.dtype(target.dtype)
    acc_dtype = accumulator_dtype(dtype, target.blend)
    acc = np.zeros(sbox.shape, acc_dtype)
    wsum = np.zeros(sbox.shape, np.float32)
    touching = grid.blocks_touching(sbox, "core" if target.blend == "none" else "block")
    for flat in touching:  # ascending flat index: the order BlockWriter adds them in a grid loop
        block = grid[flat]
        prediction = crop_prediction(block, fn(block) if pass_block else fn(block.data))
        region, values, weights = block_contribution(block, prediction, target.blend, grid.array.bounds, acc_dtype)
        add_contribution(acc, wsum, sbox, region, values, weights)
    fill = np.full(sbox.shape, target.fill_value, dtype=dtype)
    data = resolve_blend(acc, wsum, fill, target.blend, dtype)
    out = zarr.open_array(target.store(), path="0", mode="r+", zarr_format=3)
    out[sbox.slices] = data  # the whole shard in one write: no other task touches this object
    fs.pipe_file(marker, b"")
    return len(touching)


def _settings(grid: BlockGrid, target: _Target, name: str, n_levels: int) -> dict[str, Any]:
    array = grid.array
    return {
        "format": _FORMAT, "source": str(array.location), "level": array.level, "shape": list(array.shape),
        "chunks": list(array.chunks), "shards": list(output_shards(array)), "spec": grid.spec.to_dict(),
        "dtype": target.dtype, "blend": target.blend, "fill_value": target.fill_value, "name": name,
        "n_levels": n_levels, "voxel_size_nm": list(array.voxel_size_nm),
        "translation_nm": list(array.translation_nm),
    }


def _prepare(grid: BlockGrid, target: _Target, name: str, n_levels: int, downsampling: Downsampling,
             overwrite: bool, fn_id: str) -> None:
    """Create the output (first run) or check that a re-run resumes the same settings."""
    fs, done = target.fs()
    meta_path = f"{done}/meta.json"
    settings = {**_settings(grid, target, name, n_levels), "function": fn_id}
    if fs.exists(meta_path) and not overwrite:
        found = json.loads(fs.cat_file(meta_path))
        if found != settings:
            raise InvalidParameterError(
                f"{target.out} holds an unfinished or finished run with other settings {found}; expected "
                f"{settings}. Use another output or overwrite=True")
        return
    out_fs, out_path = fsspec.core.url_to_fs(target.out, **target.storage_options)
    if out_fs.exists(out_path) and not overwrite:
        raise InvalidParameterError(
            f"{target.out} exists and was not written by map_blocks (no {meta_path}); pass overwrite=True")
    if fs.exists(done):
        fs.rm(done, recursive=True)
    array = grid.array
    root = zarr.open_group(target.store(), mode="w", zarr_format=3)
    create_multiscale(root, name=name, shape=array.shape, dtype=np.dtype(target.dtype), geometry=array.geometry,
                      n_levels=n_levels, chunks=array.chunks, shards=output_shards(array), downsampling=downsampling)
    fs.makedirs(done, exist_ok=True)
    fs.pipe_file(meta_path, json.dumps(settings, indent=1).encode())


def function_id(fn: Callable[..., Any]) -> str:
    """A name for ``fn`` recorded with the run (module, qualified name and, when available, a hash of its code)."""
    code = getattr(fn, "__code__", None)
    digest = hashlib.sha256(code.co_code).hexdigest()[:12] if code is not None else "?"
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}:{digest}"


def map_blocks(
    fn: Callable[..., Any],
    grid: BlockGrid,
    out: str | os.PathLike[str],
    *,
    client: Any = None,
    dtype: Any = np.float32,
    blend: Blend = "average",
    name: str = "prediction",
    n_levels: int = 1,
    downsampling: Downsampling = "mean",
    fill_value: float = 0,
    storage_options: dict[str, Any] | None = None,
    pass_block: bool = False,
    overwrite: bool = False,
) -> MapResult:
    """Apply ``fn`` to every block of ``grid`` and write the blended result as OME-Zarr at ``out``.

    ``fn(data)`` gets a block's data with its halo (``pass_block=True``: the ``Block``) and returns a
    (z, y, x) prediction shaped like the read box (the halo is cropped) or the block box. ``out`` is a local
    path or a URL (``s3://bucket/pred.zarr``; ``storage_options`` go to fsspec, e.g. ``endpoint_url``).
    The output has the grid array's shape, voxel size, translation and chunks, and its shards up to 256^3
    (``writer.output_shards``). ``client``: a
    ``dask.distributed.Client``; one task per output shard, z-major. ``client=None`` runs the same tasks
    one after another in this process (the single-process run; the outputs are byte-identical). The run
    resumes: shards finished before are skipped. ``blend`` as ``BlockWriter``: ``none`` writes cores,
    ``average``/``smooth`` blend the overlaps.
    """
    if blend not in BLENDS:
        raise InvalidParameterError(f"blend must be one of {BLENDS}, got {blend!r}")
    began = time.monotonic()
    target = _Target(os.fspath(out), dict(storage_options or {}), np.dtype(dtype).str, blend, float(fill_value))
    _prepare(grid, target, name, n_levels, downsampling, overwrite, function_id(fn))
    array = grid.array
    boxes = shard_boxes(array.shape, output_shards(array))
    fs, done = target.fs()
    todo = [b for b in boxes if not fs.exists(f"{done}/{_marker(b)}")]
    if client is None:
        counts = [render_shard(fn, grid, target, sbox, pass_block) for sbox in todo]
    elif todo:
        # Sent once: each worker process unpickles the grid once, i.e. opens the arrays once.
        remote_grid = client.scatter(grid, broadcast=True, hash=False)
        futures = client.map(render_shard, [fn] * len(todo), [remote_grid] * len(todo), [target] * len(todo),
                             todo, [pass_block] * len(todo), pure=False)
        counts = client.gather(futures)
    else:
        counts = []
    if n_levels > 1:
        root = zarr.open_group(target.store(), mode="r+", zarr_format=3)
        write_pyramid([root[str(i)] for i in range(n_levels)], downsampling)  # type: ignore[misc]
    written = [c for c in counts if c >= 0]
    return MapResult(out=target.out, shards_written=len(written), shards_skipped=len(boxes) - len(written),
                     blocks_computed=int(sum(written)), n_blocks=len(grid), seconds=round(time.monotonic() - began, 3))
