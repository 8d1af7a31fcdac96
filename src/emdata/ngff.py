"""Write and read OME-Zarr 0.5 multiscale images and labels (zarr v3, sharded); axes are always z, y, x."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from emdata.errors import InvalidParameterError

NGFF_VERSION = "0.5"
AXES: tuple[str, str, str] = ("z", "y", "x")
UNIT = "nanometer"
DEFAULT_CHUNKS: tuple[int, int, int] = (64, 64, 64)
# 256^3 shards hold 64 chunks each: few enough files for DVC and S3, small enough to write one at a time.
DEFAULT_SHARDS: tuple[int, int, int] = (256, 256, 256)

Downsampling = Literal["mean", "nearest"]


@dataclass(frozen=True)
class Geometry:
    """Physical placement of a z, y, x array: voxel size and translation of voxel (0, 0, 0)'s centre, in nm."""

    voxel_size_nm: tuple[float, float, float]
    translation_nm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    axes: tuple[str, str, str] = field(default=AXES)

    def __post_init__(self) -> None:
        if len(self.voxel_size_nm) != 3 or any(not (v > 0) for v in self.voxel_size_nm):
            raise InvalidParameterError(
                f"voxel_size_nm must be three positive numbers (z, y, x), got {self.voxel_size_nm!r}"
            )
        if len(self.translation_nm) != 3:
            raise InvalidParameterError(f"translation_nm must have three values (z, y, x), got {self.translation_nm!r}")
        object.__setattr__(self, "voxel_size_nm", tuple(float(v) for v in self.voxel_size_nm))
        object.__setattr__(self, "translation_nm", tuple(float(v) for v in self.translation_nm))

    def level(self, index: int, downsampling: Downsampling, factor: int = 2) -> Geometry:
        """Geometry of pyramid level ``index`` made by repeated ``factor``-fold downsampling.

        Mean pooling moves voxel centres by half of the pooled extent; nearest (strided) sampling keeps them.
        """
        scale = factor**index
        voxel = tuple(v * scale for v in self.voxel_size_nm)
        if downsampling == "mean":
            shift = tuple(v * (scale - 1) / 2 for v in self.voxel_size_nm)
        else:
            shift = (0.0, 0.0, 0.0)
        translation = tuple(t + s for t, s in zip(self.translation_nm, shift, strict=True))
        return Geometry(voxel, translation, self.axes)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {"voxel_size_nm": list(self.voxel_size_nm), "translation_nm": list(self.translation_nm),
                "axes": list(self.axes), "unit": UNIT}


def level_shapes(shape: Sequence[int], n_levels: int, factor: int = 2) -> list[tuple[int, ...]]:
    """Shapes of each pyramid level (ceil division, so no voxel is lost at the border)."""
    return [tuple(max(1, math.ceil(s / factor**i)) for s in shape) for i in range(n_levels)]


def default_n_levels(shape: Sequence[int], smallest: int = 64) -> int:
    """Halve until the largest axis is at most ``smallest`` voxels."""
    return max(1, math.ceil(math.log2(max(max(shape) / smallest, 1))) + 1)


def multiscales_attrs(name: str, geometry: Geometry, n_levels: int, downsampling: Downsampling) -> dict[str, Any]:
    datasets = []
    for i in range(n_levels):
        g = geometry.level(i, downsampling)
        datasets.append({
            "path": str(i),
            "coordinateTransformations": [
                {"type": "scale", "scale": list(g.voxel_size_nm)},
                {"type": "translation", "translation": list(g.translation_nm)},
            ],
        })
    return {
        "name": name,
        "axes": [{"name": a, "type": "space", "unit": UNIT} for a in geometry.axes],
        "datasets": datasets,
        "type": "mean" if downsampling == "mean" else "nearest",
    }


def _codecs_kwargs(dtype: np.dtype) -> dict[str, Any]:
    shuffle = BloscShuffle.bitshuffle if np.dtype(dtype).itemsize == 1 else BloscShuffle.shuffle
    return {"compressors": [BloscCodec(cname="zstd", clevel=3, shuffle=shuffle)]}


def create_multiscale(
    group: zarr.Group,
    *,
    name: str,
    shape: Sequence[int],
    dtype: Any,
    geometry: Geometry,
    n_levels: int | None = None,
    chunks: Sequence[int] = DEFAULT_CHUNKS,
    shards: Sequence[int] | None = DEFAULT_SHARDS,
    downsampling: Downsampling = "mean",
    extra_attrs: dict[str, Any] | None = None,
) -> list[zarr.Array]:
    """Create empty arrays ``0..n-1`` in ``group`` and write the OME-Zarr 0.5 ``multiscales`` attributes."""
    if len(shape) != 3 or any(int(s) <= 0 for s in shape):
        raise InvalidParameterError(f"shape must be three positive sizes (z, y, x), got {tuple(shape)!r}")
    n_levels = n_levels or default_n_levels(shape)
    arrays = []
    for i, lshape in enumerate(level_shapes(shape, n_levels)):
        lchunks = tuple(min(c, s) for c, s in zip(chunks, lshape, strict=True))
        lshards = None
        if shards is not None:
            # A shard must be a multiple of the chunk; clip it to the array rounded up to whole chunks.
            lshards = tuple(
                min(sh, math.ceil(s / c) * c) for sh, s, c in zip(shards, lshape, lchunks, strict=True)
            )
        arrays.append(group.create_array(
            name=str(i), shape=lshape, chunks=lchunks, shards=lshards, dtype=dtype, fill_value=0,
            dimension_names=list(geometry.axes), overwrite=True, **_codecs_kwargs(np.dtype(dtype)),
        ))
    ome: dict[str, Any] = {"version": NGFF_VERSION,
                           "multiscales": [multiscales_attrs(name, geometry, n_levels, downsampling)]}
    attrs: dict[str, Any] = {"ome": ome}
    if extra_attrs:
        attrs.update(extra_attrs)
    group.attrs.update(attrs)
    return arrays


def create_image_group(path: Path, **kwargs: Any) -> tuple[zarr.Group, list[zarr.Array]]:
    """Create a new OME-Zarr image group at ``path`` (overwriting) and its multiscale arrays."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    return root, create_multiscale(root, **kwargs)


def ome_attrs(node: zarr.Group | zarr.Array) -> dict[str, Any]:
    """The node's ``ome`` attributes ({} when it has none); zarr types attributes as JSON, we read them as dicts."""
    return cast(dict[str, Any], node.attrs.asdict().get("ome", {}))


def multiscales(group: zarr.Group) -> dict[str, Any]:
    """The group's first (and, as we write them, only) ``multiscales`` entry."""
    ms = ome_attrs(group).get("multiscales")
    if not ms:
        raise InvalidParameterError(f"zarr group {group.path or '/'!r} is not an OME-Zarr multiscale image")
    return cast(dict[str, Any], ms[0])


def label_names(image_group: zarr.Group) -> list[str]:
    """Names of the NGFF labels of an image ([] when it has none)."""
    if "labels" not in image_group:
        return []
    labels = image_group["labels"]
    assert isinstance(labels, zarr.Group)
    return list(ome_attrs(labels).get("labels", []))


def find_images(root: zarr.Group) -> list[tuple[str, zarr.Group]]:
    """The OME-Zarr images in an output: the root itself (name ''), or its child groups (e.g. EPFL's splits)."""
    if "multiscales" in ome_attrs(root):
        return [("", root)]
    return sorted((name, g) for name, g in root.groups() if "multiscales" in ome_attrs(g))


def create_label(
    image_group: zarr.Group, label_name: str, *, colors: dict[int, list[int]] | None = None, **kwargs: Any
) -> list[zarr.Array]:
    """Create ``labels/<label_name>`` beside an image (NGFF labels), registered in ``labels``' attributes."""
    labels = image_group.require_group("labels")
    names = label_names(image_group)
    if label_name not in names:
        names.append(label_name)
    labels.attrs["ome"] = {"version": NGFF_VERSION, "labels": names}
    group = labels.create_group(label_name, overwrite=True)
    image_label: dict[str, Any] = {"version": NGFF_VERSION, "source": {"image": "../../"}}
    if colors:
        image_label["colors"] = [{"label-value": k, "rgba": v} for k, v in colors.items()]
    arrays = create_multiscale(group, name=label_name, downsampling="nearest", **kwargs)
    ome = ome_attrs(group)
    ome["image-label"] = image_label
    group.attrs["ome"] = ome
    return arrays


def block_slices(shape: Sequence[int], block: Sequence[int]) -> Iterator[tuple[slice, ...]]:
    """Slices of a regular grid of ``block``-sized boxes covering ``shape`` (the last ones clipped)."""
    ranges = [range(0, s, b) for s, b in zip(shape, block, strict=True)]
    for starts in itertools.product(*ranges):
        yield tuple(slice(st, min(st + b, s)) for st, b, s in zip(starts, block, shape, strict=True))


def _downsample(block: np.ndarray, mode: Downsampling) -> np.ndarray:
    if mode == "nearest":
        return block[::2, ::2, ::2]
    # Mean of each 2x2x2 cell; edge-pad odd sizes so the border voxel is averaged with itself.
    pad = [(0, s % 2) for s in block.shape]
    if any(p[1] for p in pad):
        block = np.pad(block, pad, mode="edge")
    z, y, x = (s // 2 for s in block.shape)
    acc = block.reshape(z, 2, y, 2, x, 2).astype(np.float32).mean(axis=(1, 3, 5))
    if np.issubdtype(block.dtype, np.integer):
        acc = np.rint(acc)
    return acc.astype(block.dtype)


def write_pyramid(arrays: Sequence[zarr.Array], downsampling: Downsampling) -> None:
    """Fill levels 1.. from level 0, one output shard at a time (bounded memory)."""
    for src, dst in itertools.pairwise(arrays):
        write_block = dst.shards or dst.chunks
        for out in block_slices(dst.shape, write_block):
            inp = tuple(slice(s.start * 2, min(s.stop * 2, n)) for s, n in zip(out, src.shape, strict=True))
            dst[out] = _downsample(np.asarray(src[inp]), downsampling)


def write_block_aligned(array: zarr.Array, source: Any, *, slab: Sequence[int] | None = None) -> None:
    """Copy ``source`` (anything sliceable as z, y, x) into ``array`` one whole shard (or slab) at a time."""
    block = tuple(slab) if slab is not None else (array.shards or array.chunks)
    for sl in block_slices(array.shape, block):
        array[sl] = np.asarray(source[sl])


def check_read_back(array: zarr.Array, expected: Any, what: str) -> None:
    """Read ``array`` back one shard at a time and compare it with ``expected`` (anything sliceable z, y, x)."""
    from emdata.errors import SourceMismatchError

    for sl in block_slices(array.shape, array.shards or array.chunks):
        if not np.array_equal(array[sl], np.asarray(expected[sl])):
            raise SourceMismatchError(f"conversion of {what} does not read back equal at {sl}")


def open_multiscale(path: Path | str, *, label: str | None = None) -> tuple[dict[str, Any], list[zarr.Array]]:
    """Open an OME-Zarr image (or one of its labels) and return its ``multiscales[0]`` and level arrays."""
    root = zarr.open_group(str(path), mode="r", zarr_format=3)
    group = root[f"labels/{label}"] if label is not None else root
    assert isinstance(group, zarr.Group)
    ms = multiscales(group)
    arrays = [group[d["path"]] for d in ms["datasets"]]
    return ms, arrays  # type: ignore[return-value]
