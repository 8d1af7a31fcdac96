"""Small OME-Zarr volumes for the access tests (axes z, y, x), and a writer process for the multi-writer test."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from emdata.ngff import Geometry, create_image_group, create_label, write_pyramid


def em_like(shape: Sequence[int], seed: int = 0, dtype: str = "uint8") -> np.ndarray:
    """Smooth-ish noise that compresses like EM (not constant, not white)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, [max(1, s // 4 + 1) for s in shape]).astype(np.float32)
    up = coarse.repeat(4, 0).repeat(4, 1).repeat(4, 2)[tuple(slice(0, s) for s in shape)]
    noise = rng.normal(0, 12, shape)
    return np.clip(up + noise, 0, 255).astype(dtype)


def make_volume(
    path: Path,
    data: np.ndarray,
    *,
    voxel_size_nm: Sequence[float] = (8.0, 4.0, 4.0),
    translation_nm: Sequence[float] = (0.0, 0.0, 0.0),
    n_levels: int = 2,
    chunks: Sequence[int] = (8, 8, 8),
    shards: Sequence[int] | None = (16, 16, 16),
    labels: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write ``data`` (z, y, x) as an OME-Zarr image with a mean pyramid and optional nearest-pyramid labels."""
    geometry = Geometry(tuple(voxel_size_nm), tuple(translation_nm))  # type: ignore[arg-type]
    root, arrays = create_image_group(path, name=path.stem, shape=data.shape, dtype=data.dtype, geometry=geometry,
                                      n_levels=n_levels, chunks=chunks, shards=shards)
    arrays[0][...] = data
    write_pyramid(arrays, "mean")
    for name, lab in (labels or {}).items():
        larrays = create_label(root, name, shape=lab.shape, dtype=lab.dtype, geometry=geometry, n_levels=n_levels,
                               chunks=chunks, shards=shards)
        larrays[0][...] = lab
        write_pyramid(larrays, "nearest")
    return path


def write_blocks_in_process(source: str, out: str, spec_dict: dict, indices: list[int], blend: str) -> int:
    """Open the source and a writer in this process and write the given blocks' predictions (data * 2)."""
    from emdata.access import BlockGrid, BlockSpec, Box, open_array
    from emdata.access.writer import BlockWriter

    spec_kwargs = dict(spec_dict)
    roi = spec_kwargs.pop("roi_voxels")
    spec_kwargs.pop("roi_nm")
    spec = BlockSpec(**spec_kwargs, roi_voxels=None if roi is None else Box(tuple(roi[0]), tuple(roi[1])))
    grid = BlockGrid(open_array(source, backend="zarr"), spec, prefetch=0)
    writer = BlockWriter(out, grid, dtype="float32", blend=blend)  # type: ignore[arg-type]
    written = 0
    for i in indices:
        block = grid[i]
        written += writer.write(block, block.data.astype(np.float32) * 2)
    return written
