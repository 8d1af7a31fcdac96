"""Write and read OME-Zarr 0.5 multiscale images and labels (zarr v3, sharded); axes are always z, y, x."""

from __future__ import annotations

import colorsys
import importlib.metadata
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from emdata import pyramid
from emdata.errors import InvalidParameterError, SourceMismatchError

log = logging.getLogger(__name__)

NGFF_VERSION = "0.5"
AXES: tuple[str, str, str] = ("z", "y", "x")
UNIT = "nanometer"
DEFAULT_CHUNKS: tuple[int, int, int] = (64, 64, 64)
# 256^3 shards hold 64 chunks each: few enough files for DVC and S3, small enough to write one at a time.
DEFAULT_SHARDS: tuple[int, int, int] = (256, 256, 256)
# The uint8 stages' image shards: 64 MiB of decoded voxels. `dvc pull` pays ~8 ms per file whatever its size, so
# fewer, larger files (bench/README.md, "Second layout pass"). Labels share their image's shards; a wider one
# (uint64 segmentation: 512 MiB per shard decoded, a few MB stored) is written in pieces of at most
# ``_Sink.INFLIGHT_BYTES`` (``write_unit``).
UINT8_SHARDS: tuple[int, int, int] = (256, 512, 512)

Downsampling = Literal["mean", "mode", "nearest"]
PROGRESS_EVERY_S = 5.0  # a long write logs its progress at least this often


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
        """Geometry of pyramid level ``index`` made by repeated ``factor``-fold downsampling on every axis."""
        scale = factor**index
        return self.scaled((scale, scale, scale), downsampling)

    def scaled(self, factors: Sequence[int], downsampling: Downsampling) -> Geometry:
        """Geometry of a level downsampled by ``factors`` (z, y, x) relative to this one.

        Mean and mode pooling put a voxel at the centre of its cell, half of the pooled extent on;
        nearest (strided) sampling keeps the first voxel's centre.
        """
        voxel = tuple(v * f for v, f in zip(self.voxel_size_nm, factors, strict=True))
        shift: tuple[float, ...] = (0.0, 0.0, 0.0)
        if downsampling != "nearest":
            shift = tuple(v * (f - 1) / 2 for v, f in zip(self.voxel_size_nm, factors, strict=True))
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


def multiscales_attrs(name: str, geometry: Geometry, n_levels: int, downsampling: Downsampling,
                      factors: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
    """One ``multiscales`` entry; ``factors`` per level (level 0 first), else 2 on every axis per level."""
    if factors is None:
        factors = [(1, 1, 1)] + [(2, 2, 2)] * (n_levels - 1)
    datasets = []
    for i, cum in enumerate(pyramid.cumulative(factors[:n_levels])):
        g = geometry.scaled(cum, downsampling)
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
        "type": downsampling,
        "metadata": {
            "description": pyramid.DESCRIPTIONS[downsampling],
            "method": f"emdata.pyramid.{downsampling}",
            "version": _emdata_version(),
            "kwargs": {"factors": [[int(v) for v in f] for f in factors[:n_levels]]},
        },
    }


def _emdata_version() -> str:
    try:
        return importlib.metadata.version("emdata")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


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
    factors: Sequence[Sequence[int]] | None = None,
) -> list[zarr.Array]:
    """Create empty arrays ``0..n-1`` in ``group`` and write the OME-Zarr 0.5 ``multiscales`` attributes.

    ``factors`` (per level, level 0 first; see ``pyramid.plan_factors``) sets the levels; without it there are
    ``n_levels`` levels halving every axis.
    """
    if len(shape) != 3 or any(int(s) <= 0 for s in shape):
        raise InvalidParameterError(f"shape must be three positive sizes (z, y, x), got {tuple(shape)!r}")
    if factors is None:
        n_levels = n_levels or default_n_levels(shape)
        factors = [(1, 1, 1)] + [(2, 2, 2)] * (n_levels - 1)
    n_levels = len(factors)
    arrays = []
    for i, lshape in enumerate(pyramid.shapes(shape, factors)):
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
                           "multiscales": [multiscales_attrs(name, geometry, n_levels, downsampling, factors)]}
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
    """The OME-Zarr images in an output: the ``series`` of a collection (``write_collection``), the root itself
    (name ''), or else its child image groups."""
    if "bioformats2raw.layout" in ome_attrs(root) and "OME" in root:
        ome_group = root["OME"]
        assert isinstance(ome_group, zarr.Group)
        series = ome_attrs(ome_group).get("series")
        if series is not None:
            found = []
            for path in series:
                group = root[path]
                assert isinstance(group, zarr.Group)
                found.append((str(path), group))
            return found
    if "multiscales" in ome_attrs(root):
        return [("", root)]
    return sorted((name, g) for name, g in root.groups() if "multiscales" in ome_attrs(g))


# OME-XML pixel types of the numpy dtypes an image may have (OME 2016-06 has no 64-bit integers).
_OME_TYPES = {"int8": "int8", "int16": "int16", "int32": "int32", "uint8": "uint8", "uint16": "uint16",
              "uint32": "uint32", "float32": "float", "float64": "double", "bool": "bit"}
OME_XML_NS = "http://www.openmicroscopy.org/Schemas/OME/2016-06"


def write_collection(root: zarr.Group, image_paths: Sequence[str]) -> None:
    """Declare ``root`` an OME-Zarr collection of the images at ``image_paths`` (its child image groups).

    NGFF 0.5's collection layout ("bioformats2raw.layout": 3): the root's ``ome`` attributes carry the layout,
    an ``OME`` group lists the images as ``series`` (so they keep their names, e.g. EPFL's ``training`` and
    ``testing``), and ``OME/METADATA.ome.xml`` has one OME-XML Image per series (ID ``Image:<path>``, which
    napari-ome-zarr follows). Other root attributes (e.g. provenance) are kept.

    The root's ``ome`` attributes also carry ``multiscales``: one named entry per image whose dataset paths lead
    into that image (``training/0``, ...). NGFF lets a group hold several named multiscales (readers fall back
    to the first); ome-zarr-py 0.18, the reader behind ``ome_zarr info``, has no support for the bioformats2raw
    layout (ome/ome-zarr-py#421) and would show nothing at the root, so this lets it find the first image there.
    napari-ome-zarr (0.10) reads the layout itself and opens every series with its labels. Both the
    bf2raw schema and ome-zarr-models accept the root. emdata's own readers (``find_images``, ``open_array``)
    take the root for the collection it is and ask which image.
    """
    import xml.etree.ElementTree as ET

    paths = [str(p) for p in image_paths]
    if not paths or len(set(paths)) != len(paths):
        raise InvalidParameterError(f"a collection needs distinct image paths, got {paths}")
    root_multiscales: list[dict[str, Any]] = []
    ET.register_namespace("", OME_XML_NS)
    ome_xml = ET.Element(f"{{{OME_XML_NS}}}OME", {"Creator": f"emdata {_emdata_version()}"})
    for i, path in enumerate(paths):
        if path not in root or not isinstance(root[path], zarr.Group) or "multiscales" not in ome_attrs(
                root[path]):  # type: ignore[arg-type]
            raise InvalidParameterError(f"{path!r} is not an OME-Zarr image group in {root.store}:{root.path or '/'}")
        group = root[path]
        assert isinstance(group, zarr.Group)
        ms = multiscales(group)
        root_multiscales.append({**ms, "name": path,
                                 "datasets": [{**d, "path": f"{path}/{d['path']}"} for d in ms["datasets"]]})
        level0 = group[ms["datasets"][0]["path"]]
        assert isinstance(level0, zarr.Array)
        pixel_type = _OME_TYPES.get(str(level0.dtype))
        if pixel_type is None:
            raise InvalidParameterError(f"{path!r} has dtype {level0.dtype}, which OME-XML cannot describe")
        scale = next(t["scale"] for t in ms["datasets"][0]["coordinateTransformations"] if t["type"] == "scale")
        z, y, x = (int(v) for v in level0.shape)
        image = ET.SubElement(ome_xml, f"{{{OME_XML_NS}}}Image", {"ID": f"Image:{path}", "Name": path})
        pixels = ET.SubElement(image, f"{{{OME_XML_NS}}}Pixels", {
            "ID": f"Pixels:{i}", "DimensionOrder": "XYZCT", "Type": pixel_type,
            "SizeX": str(x), "SizeY": str(y), "SizeZ": str(z), "SizeC": "1", "SizeT": "1",
            "PhysicalSizeX": repr(float(scale[2])), "PhysicalSizeXUnit": "nm",
            "PhysicalSizeY": repr(float(scale[1])), "PhysicalSizeYUnit": "nm",
            "PhysicalSizeZ": repr(float(scale[0])), "PhysicalSizeZUnit": "nm"})
        ET.SubElement(pixels, f"{{{OME_XML_NS}}}Channel", {"ID": f"Channel:{i}:0", "SamplesPerPixel": "1"})
        ET.SubElement(pixels, f"{{{OME_XML_NS}}}MetadataOnly")
    ome = dict(ome_attrs(root))
    ome.update({"version": NGFF_VERSION, "bioformats2raw.layout": 3, "multiscales": root_multiscales})
    root.attrs["ome"] = ome
    ome_group = root.create_group("OME", overwrite=True)
    ome_group.attrs["ome"] = {"version": NGFF_VERSION, "series": paths}
    xml = ET.tostring(ome_xml, encoding="UTF-8", xml_declaration=True)
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    key = "/".join(p for p in (root.path, "OME", "METADATA.ome.xml") if p)
    sync(root.store.set(key, default_buffer_prototype().buffer.from_bytes(xml)))


def _label_value(label_name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidParameterError(f"label {label_name!r}: label values must be integers, got {value!r}")
    return int(value)


def _default_color(value: int) -> tuple[int, int, int, int]:
    """Transparent for 0 (background); otherwise a distinct, stable hue per value (golden-ratio steps)."""
    if value == 0:
        return (0, 0, 0, 0)
    r, g, b = colorsys.hsv_to_rgb((value * 0.618033988749895) % 1.0, 0.75, 1.0)
    return (round(r * 255), round(g * 255), round(b * 255), 255)


def _label_colors(label_name: str, colors: Mapping[int, Sequence[int]]) -> list[dict[str, Any]]:
    out = []
    for value, rgba in colors.items():
        if len(rgba) != 4 or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c <= 255
                                 for c in rgba):
            raise InvalidParameterError(f"label {label_name!r}: the color of {value!r} must be four integers "
                                        f"0-255 (RGBA), got {rgba!r}")
        out.append({"label-value": _label_value(label_name, value), "rgba": [int(c) for c in rgba]})
    return out


def create_label(
    image_group: zarr.Group, label_name: str, *, colors: Mapping[int, Sequence[int]] | None = None,
    properties: Mapping[int, Mapping[str, Any]] | None = None, downsampling: Downsampling = "nearest",
    **kwargs: Any,
) -> list[zarr.Array]:
    """Create ``labels/<label_name>`` beside an image (NGFF labels), registered in ``labels``' attributes."""
    labels = image_group.require_group("labels")
    names = label_names(image_group)
    if label_name not in names:
        names.append(label_name)
    labels.attrs["ome"] = {"version": NGFF_VERSION, "labels": names}
    group = labels.create_group(label_name, overwrite=True)
    image_label: dict[str, Any] = {"version": NGFF_VERSION, "source": {"image": "../../"}}
    # NGFF's strict label schema wants colors: without any given, background (0) is transparent. Validators
    # (ome-zarr-models) want the same label values in colors and properties: each list is completed.
    colors = dict(colors) if colors else {0: (0, 0, 0, 0)}
    props = {k: dict(v) for k, v in properties.items()} if properties else {}
    for k, v in props.items():
        if "label-value" in v:
            raise InvalidParameterError(f"label {label_name!r}: properties of {k!r} must not hold 'label-value'")
    if props:
        for value in props:
            colors.setdefault(value, _default_color(_label_value(label_name, value)))
        for value in colors:
            props.setdefault(value, {})
    image_label["colors"] = _label_colors(label_name, colors)
    if props:
        image_label["properties"] = [{"label-value": _label_value(label_name, k), **v} for k, v in props.items()]
    arrays = create_multiscale(group, name=label_name, downsampling=downsampling, **kwargs)
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
    """One 2x2x2 step of ``mode`` (kept for callers of the isotropic pyramid)."""
    return pyramid.reduce(block, (2, 2, 2), mode)


def write_pyramid(arrays: Sequence[zarr.Array], downsampling: Downsampling,
                  factors: Sequence[Sequence[int]] | None = None) -> None:
    """Fill levels 1.. from level 0, one output shard at a time (bounded memory); a second pass over level 0.

    ``factors`` per level (level 0 first) as the arrays were created with; 2 on every axis without it.
    """
    steps = list(factors[1:]) if factors is not None else [(2, 2, 2)] * (len(arrays) - 1)
    for (src, dst), f in zip(itertools.pairwise(arrays), steps, strict=True):
        write_block = dst.shards or dst.chunks
        for out in block_slices(dst.shape, write_block):
            inp = tuple(slice(s.start * fa, min(s.stop * fa, n))
                        for s, fa, n in zip(out, f, src.shape, strict=True))
            dst[out] = pyramid.reduce(np.asarray(src[inp]), f, downsampling)


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


# ----------------------------------------------------------------------------- one call: image, pyramid, labels
Box = tuple[slice, slice, slice]


@dataclass(frozen=True)
class Blocks:
    """A volume read block by block, for sources that stream (e.g. tensorstore with reads in flight).

    ``read(boxes)`` must yield one array per box, in the order given (it may read ahead); ``write_image``
    chooses the boxes (whole output shards) and checks each array's shape and dtype.
    """

    shape: tuple[int, int, int]
    dtype: np.dtype
    read: Callable[[Sequence[Box]], Iterable[np.ndarray]]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))


@dataclass(frozen=True)
class Label:
    """An NGFF label image written beside the image (``labels/<name>``), on the image's grid and levels.

    ``source``: an array-like (z, y, x; ``shape``, ``dtype``, sliceable) or ``Blocks``. ``colors``: label
    value -> RGBA (0-255); ``properties``: label value -> {"name": ..., ...}. ``method``: "mode" (majority) for
    segmentations, "nearest" for binary masks.
    """

    name: str
    source: Any
    colors: Mapping[int, Sequence[int]] | None = None
    properties: Mapping[int, Mapping[str, Any]] | None = None
    method: Downsampling = "mode"


def write_unit(shard: Sequence[int], chunks: Sequence[int], itemsize: int, most: int) -> tuple[int, ...]:
    """The level-0 box written at once: the shard, or for a shard of more than ``most`` bytes decoded, the shard
    halved along its longest axis (ties: the last), on whole chunks, until a piece holds at most ``most`` (or no
    axis halves on whole chunks). A uint64 label shard of 256 x 512 x 512 (512 MiB decoded) is written in 256^3
    pieces of 128 MiB."""
    unit = [int(s) for s in shard]
    while math.prod(unit) * itemsize > most:
        halvable = [a for a in range(len(unit)) if unit[a] % 2 == 0 and (unit[a] // 2) % int(chunks[a]) == 0]
        if not halvable:
            break
        axis = max(halvable, key=lambda a: (unit[a], a))
        unit[axis] //= 2
    return tuple(unit)


def shard_order(shape: Sequence[int], factors: Sequence[Sequence[int]], block: Sequence[int],
                level_blocks: Sequence[Sequence[int]]) -> list[Box]:
    """Level-0 shard boxes ordered so that each upper-level shard's sources come one after another.

    Sorting by the index of the containing shard at the top level, then the next level down, ... keeps at most
    one unfinished shard per level in memory (when shard grids nest, as they do for equal shard sizes), so the
    streaming pyramid's memory does not grow with the volume.
    """
    cum = pyramid.cumulative(factors)

    def key(box: Box) -> tuple[int, ...]:
        k: list[int] = []
        for lvl in range(len(cum) - 1, -1, -1):
            k.extend((b.start // c) // lb for b, c, lb in zip(box, cum[lvl], level_blocks[lvl], strict=True))
        return tuple(k)

    return sorted(block_slices(shape, block), key=key)  # type: ignore[arg-type]


Backend = Literal["zarr", "tensorstore"]
BACKENDS: tuple[str, ...] = ("zarr", "tensorstore")


class _Sink:
    """Writes whole shards of one level and (with ``verify``) reads each back and compares it.

    ``zarr``: zarr-python, synchronously. ``tensorstore``: the same zarr v3 array (created by zarr-python, so its
    zarr.json is the same) written through tensorstore, several shard writes in flight (up to ``INFLIGHT_BYTES``
    of decoded voxels, at most ``max_depth`` shards), so encoding runs on tensorstore's threads while Python
    reads and reduces the next shard. ``depth`` shards stay held after ``put`` returns (0: ``put`` writes and
    verifies before it returns); ``make_room`` finishes all but ``depth - 1`` of them, so that the caller can
    fetch its next shard without holding more than ``depth`` shards besides it. Tensorstore encodes straight from the array handed to it (no copy): the
    array is never changed afterwards. With ``verify``, each shard, once written, is read back from the file
    (the context has no chunk cache, so the bytes come from disk) in z-slabs of whole chunks of at most
    ``READ_BYTES``, each decoded and compared voxel for voxel with the array written; the written array is
    dropped as soon as it has been compared.
    """

    INFLIGHT_BYTES = 128 * 2**20
    MAX_DEPTH = 32
    READ_BYTES = 32 * 2**20

    def __init__(self, array: zarr.Array, backend: Backend, verify: bool, what: str, context: Any,
                 max_depth: int = MAX_DEPTH, min_depth: int = 1) -> None:
        self.array, self.backend, self.verify, self.what = array, backend, verify, what
        shard_bytes = math.prod(array.shards or array.chunks) * array.dtype.itemsize
        self.depth = max(min_depth, min(max_depth, self.INFLIGHT_BYTES // shard_bytes))
        # Each entry: box, the array written (None once it need not be kept), the write's future.
        self.pending: deque[tuple[Box, np.ndarray | None, Any]] = deque()
        self.reading: deque[tuple[Box, Any]] = deque()
        self.seconds = 0.0
        # sum_voxels (integer voxels): each box's ``_exact_sum`` is added to voxel_sum, made from the chunks as
        # they are decoded and compared (in cache, on the decoding threads) instead of a pass of its own over the
        # data; the same float, box by box in the order written, as summing each box where it is written.
        self.sum_voxels = False
        self.voxel_sum = 0.0
        self.store: Any = None
        self.path: Path | None = None
        if backend == "tensorstore":
            import tensorstore as ts

            root = getattr(array.store, "root", None)
            if root is None:
                raise InvalidParameterError(f"backend='tensorstore' writes local directories; {self.what} is in "
                                            f"a {type(array.store).__name__}")
            path = Path(str(root)) / array.path
            spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
            self.store = ts.open(spec, open=True, context=context).result()
            self.path = path
            if tuple(self.store.shape) != tuple(array.shape) or self.store.dtype.numpy_dtype != array.dtype:
                raise RuntimeError(f"tensorstore opened {path} as {self.store.shape} {self.store.dtype}, "
                                   f"zarr-python created {array.shape} {array.dtype}")

    def put(self, box: Box, data: np.ndarray) -> None:
        began = time.monotonic()
        try:
            if self.store is None:
                self.array[box] = data
                if self.verify:
                    self._check(box, data, self.array[box])
            else:
                future = self.store[box].write(data, can_reference_source_data_indefinitely=True)
                self.pending.append((box, data if self.verify else None, future))
                self._drain(self.depth)
        finally:
            self.seconds += time.monotonic() - began

    def _slabs(self, box: Box) -> list[tuple[slice, slice, slice]]:
        """``box`` cut along z into slabs of whole chunks of at most ``READ_BYTES`` (at least one chunk)."""
        cz = int(self.array.chunks[0])
        plane = math.prod(b.stop - b.start for b in box[1:]) * self.array.dtype.itemsize
        step = max(cz, self.READ_BYTES // max(plane, 1) // cz * cz)
        z0, z1 = box[0].start, box[0].stop
        return [(slice(z, min(z + step, z1)), box[1], box[2]) for z in range(z0, z1, step)]

    def _finish(self, box: Box, data: np.ndarray | None, future: Any) -> None:
        future.result()
        if data is None:
            return
        if self._verify_direct(box, data):
            return
        # Two slab reads in flight: one decodes while the other is compared.
        self.reading = deque()
        for slab in self._slabs(box):
            self.reading.append((slab, self.store[slab].read()))
            if len(self.reading) == 2:
                self._compare(box, data, *self.reading.popleft())
        while self.reading:
            self._compare(box, data, *self.reading.popleft())
        if self.sum_voxels:
            self.voxel_sum += _exact_sum(data)

    def _verify_direct(self, box: Box, data: np.ndarray) -> bool:
        """Decode the chunks of ``box`` straight from the shard files just written and compare them with ``data``.

        ``emdata.shards.ShardReader`` (a fresh one: no cached index) reads each chunk: the shard's index checked
        against its crc32c, the chunk blosc-decoded with numcodecs (the same c-blosc; about half the CPU of a
        tensorstore read), a chunk not stored read as the fill value; on the shared decoding threads. A chunk
        that does not decode, or a damaged index, is a mismatch naming that chunk. False (nothing checked) where
        the reader does not apply (another layout or codec) or ``box`` is not on whole chunks: the caller reads
        back through tensorstore."""
        from emdata.shards import CorruptShardError, ShardReader, decode_pool, decode_threads

        reader = ShardReader.for_array(self.path, self.array.dtype, self.array.fill_value) if self.path else None
        if reader is None:
            return False
        chunks, shape, per = reader.chunks_shape, reader.shape, reader.per_shard
        if len(chunks) != len(box) or any(b.start % c or (b.stop % c and b.stop != n)
                                          for b, c, n in zip(box, chunks, shape, strict=True)):
            return False
        by_shard: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
        for cidx in itertools.product(*(range(b.start // c, -(-b.stop // c)) for b, c in zip(box, chunks, strict=True))):
            by_shard.setdefault(tuple(i // p for i, p in zip(cidx, per, strict=True)), []).append(cidx)

        summed = self.sum_voxels

        def check(members: list[tuple[int, ...]]) -> tuple[tuple[int, ...] | None, int]:
            """The first chunk of ``members`` (all in one shard) that differs from ``data`` (None: all equal),
            and (``sum_voxels``) the sum of their voxels."""
            decoded = reader.chunks(members, scratch=True)
            total = 0
            for cidx in members:
                lo = [i * c for i, c in zip(cidx, chunks, strict=True)]
                hi = [min(a + c, n) for a, c, n in zip(lo, chunks, shape, strict=True)]
                try:
                    got = next(decoded)
                except (CorruptShardError, RuntimeError, ValueError):  # damaged index or bytes blosc refuses
                    return cidx, total
                want = data[tuple(slice(a - b.start, h - b.start) for a, h, b in zip(lo, hi, box, strict=True))]
                got = got[tuple(slice(0, h - a) for a, h in zip(lo, hi, strict=True))]
                if not _equal(got, want):
                    return cidx, total
                if summed:  # equal to what was written: its sum is the data's
                    total += _int_sum(got)
            return None, total

        n = decode_threads()
        groups = [g for members in by_shard.values() for g in (members[i::n] for i in range(n)) if g]
        box_sum = 0
        for bad, total in decode_pool().map(check, groups):
            if bad is not None:
                raise SourceMismatchError(f"conversion of {self.what} does not read back equal at {box} "
                                          f"(chunk {bad})")
            box_sum += total
        if summed:
            self.voxel_sum += float(_wrap64(box_sum, data.dtype.kind))
        return True

    def _compare(self, box: Box, data: np.ndarray, slab: Box, read: Any) -> None:
        z = slice(slab[0].start - box[0].start, slab[0].stop - box[0].start)
        if not np.array_equal(read.result(), data[z]):
            raise SourceMismatchError(f"conversion of {self.what} does not read back equal at {box}")

    def make_room(self) -> None:
        began = time.monotonic()
        try:
            self._drain(max(self.depth - 1, 0))
        finally:
            self.seconds += time.monotonic() - began

    def _drain(self, limit: int) -> None:
        while len(self.pending) > limit:
            self._finish(*self.pending.popleft())

    def _check(self, box: Box, data: np.ndarray, back: Any) -> None:
        if not np.array_equal(back, data):
            raise SourceMismatchError(f"conversion of {self.what} does not read back equal at {box}")

    def flush(self) -> None:
        began = time.monotonic()
        try:
            self._drain(0)
        finally:
            self.seconds += time.monotonic() - began

    def cancel(self) -> None:
        for _, _, future in self.pending:
            future.cancel()
        for _, read in self.reading:
            read.cancel()
        self.pending.clear()


class _StreamingPyramid:
    """Takes level-0 boxes (shards, or ``write_unit`` pieces of them) in ``shard_order`` and writes every upper
    level shard as soon as it is complete.

    Each level's shard is filled in a buffer from the reductions of the level below and written whole, except
    on levels whose shard is larger than ``DIRECT_BYTES`` (256^3 uint64 labels: 128 MiB) and whose pieces are
    whole chunks: there each reduced piece is written where it belongs as it comes (tensorstore adds its
    chunks to the shard file; the write and its read-back finish before the next piece), and reduced further
    on its own, so no buffer of a whole shard is held. Reducing a piece gives the same voxels as reducing the
    whole level: pieces start on even voxels and end on even voxels or at the level's end.
    """

    DIRECT_BYTES = 64 * 2**20

    def __init__(self, sinks: Sequence[_Sink], factors: Sequence[Sequence[int]], method: Downsampling,
                 unit: Sequence[int]):
        self.sinks = list(sinks)
        self.arrays = [sink.array for sink in self.sinks]
        self.factors = [tuple(int(v) for v in f) for f in factors]
        self.method = method
        self.blocks = [tuple(a.shards or a.chunks) for a in self.arrays]
        self.pending: list[dict[tuple[int, ...], list[Any]]] = [{} for _ in self.arrays]
        self.peak_bytes = 0
        self.seconds = 0.0
        # direct[level]: pieces of that level are written as they come (see above); unit: what a level passes up.
        self.direct = [False] * len(self.arrays)
        unit = tuple(unit)  # the level-0 boxes ``add`` receives (shards, or write_unit pieces of them)
        for level in range(1, len(self.arrays)):
            array, f = self.arrays[level], self.factors[level]
            piece = tuple(u // fa for u, fa in zip(unit, f, strict=True))
            big = math.prod(self.blocks[level]) * array.dtype.itemsize > self.DIRECT_BYTES
            whole = all(u % fa == 0 and p % c == 0 and b % p == 0 for u, fa, p, c, b in zip(
                unit, f, piece, array.chunks, self.blocks[level], strict=True))
            if big and whole and self.sinks[level].backend == "tensorstore":
                self.direct[level] = True
                self.sinks[level].depth = 0  # one piece of a shard at a time: no two writes to one shard file
                unit = piece
            else:
                unit = self.blocks[level]

    def add(self, level: int, start: Sequence[int], data: np.ndarray) -> None:
        """``data`` at ``start`` of ``level - 1`` is complete: reduce it into ``level``."""
        if level >= len(self.arrays):
            return
        began = time.monotonic()
        f = self.factors[level]
        if any(s % fa for s, fa in zip(start, f, strict=True)):
            raise InvalidParameterError(f"a block at {tuple(start)} of level {level - 1} is not aligned to the "
                                        f"downsampling factors {f}: choose shards that are multiples of them")
        red = pyramid.reduce(data, f, self.method)
        ostart = [s // fa for s, fa in zip(start, f, strict=True)]
        if self.direct[level]:
            self.seconds += time.monotonic() - began
            box = tuple(slice(o, o + n) for o, n in zip(ostart, red.shape, strict=True))
            self.sinks[level].put(box, red)  # type: ignore[arg-type]
            self.add(level + 1, ostart, red)
            return
        array, block, pending = self.arrays[level], self.blocks[level], self.pending[level]
        ranges = [range(o // b, (o + n - 1) // b + 1) for o, n, b in zip(ostart, red.shape, block, strict=True)]
        done: list[tuple[list[int], np.ndarray]] = []
        for idx in itertools.product(*ranges):
            lo_sh = [i * b for i, b in zip(idx, block, strict=True)]
            hi_sh = [min(lo + b, n) for lo, b, n in zip(lo_sh, block, array.shape, strict=True)]
            lo = [max(a, b) for a, b in zip(ostart, lo_sh, strict=True)]
            hi = [min(o + n, h) for o, n, h in zip(ostart, red.shape, hi_sh, strict=True)]
            entry = pending.get(idx)
            if entry is None:
                entry = pending[idx] = [np.empty([h - lo_ for lo_, h in zip(lo_sh, hi_sh, strict=True)], red.dtype), 0]
            buf = entry[0]
            buf[tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, lo_sh, strict=True))] = \
                red[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, ostart, strict=True))]
            entry[1] += math.prod(b - a for a, b in zip(lo, hi, strict=True))
            if entry[1] == buf.size:
                del pending[idx]
                done.append((lo_sh, buf))
        self.peak_bytes = max(self.peak_bytes, sum(e[0].nbytes for p in self.pending for e in p.values()))
        self.seconds += time.monotonic() - began
        for lo_sh, buf in done:
            box = tuple(slice(a, a + n) for a, n in zip(lo_sh, buf.shape, strict=True))
            self.sinks[level].put(box, buf)  # type: ignore[arg-type]
            self.add(level + 1, lo_sh, buf)

    def finish(self, what: str) -> None:
        for level, pending in enumerate(self.pending):
            if pending:
                raise RuntimeError(f"pyramid of {what}: level {level} has unfinished shards {sorted(pending)}")


def _source_shape_dtype(source: Any, what: str) -> tuple[tuple[int, int, int], np.dtype]:
    try:
        shape = tuple(int(s) for s in source.shape)
        dtype = np.dtype(source.dtype)
    except (AttributeError, TypeError) as exc:
        raise InvalidParameterError(f"{what}: the source must be array-like (shape, dtype) or Blocks, "
                                    f"got {type(source).__name__}") from exc
    if len(shape) != 3 or any(s <= 0 for s in shape):
        raise InvalidParameterError(f"{what}: the source must be 3-D (z, y, x) and not empty, got shape {shape}")
    return shape, dtype  # type: ignore[return-value]


def _int_sum(data: np.ndarray) -> int:
    """Sum of integer voxels as numpy's 64-bit sum gives it (exact below 2**63; wrapping like numpy beyond).

    8- and 16-bit integers are first summed along z, plane onto plane, in the narrowest integer that cannot
    overflow (as many planes as it holds: 257 of uint8 in uint16), then in 64 bits: an element-wise add per
    plane, 1.3-2x faster than summing along x (rows of 64-256 voxels) and a fifth of the time of one uint64 sum.
    """
    kind, size = data.dtype.kind, data.dtype.itemsize
    acc = np.int64 if kind == "i" else np.uint64
    if size <= 2 and data.ndim == 3 and data.size:
        wide = {1: np.int16 if kind == "i" else np.uint16, 2: np.int32 if kind == "i" else np.uint32}[size]
        info = np.iinfo(data.dtype)
        step = int(np.iinfo(wide).max) // max(abs(int(info.min)), int(info.max))
        return sum(int(data[z:z + step].sum(axis=0, dtype=wide).sum(dtype=acc)) for z in range(0, data.shape[0], step))
    return int(data.sum(dtype=acc))


def _wrap64(total: int, kind: str) -> int:
    """``total`` as a 64-bit sum of that kind holds it: the sum of the parts' ``_int_sum`` is the whole's."""
    total %= 2**64
    return total - 2**64 if kind == "i" and total >= 2**63 else total


def _exact_sum(data: np.ndarray) -> float:
    """Sum of ``data``'s voxels (exact for integers below 2**53; see ``_int_sum``)."""
    kind = data.dtype.kind
    if kind in "iu":
        return float(_int_sum(data))
    if kind == "b":
        return float(data.sum(dtype=np.uint64))
    return float(data.sum(dtype=np.float64))


_eq_local = threading.local()


def _equal(got: np.ndarray, want: np.ndarray) -> bool:
    """``np.array_equal`` of two arrays of one shape and dtype, voxel for voxel, the element-wise result written
    into this thread's reused bool buffer instead of a new array per call (a decoded 64^3 chunk compared against
    the shard written: ~8% less CPU than ``np.array_equal``, measured on uint64 shards not in cache)."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return bool(np.array_equal(got, want))
    buf = getattr(_eq_local, "buf", None)
    if buf is None or buf.size < got.size:
        buf = _eq_local.buf = np.empty(max(got.size, 1), dtype=bool)
    out = buf[:got.size].reshape(got.shape)
    np.equal(got, want, out=out)
    return bool(out.all())


def _tensorstore_context() -> Any:
    import tensorstore as ts

    # No chunk cache: a read-back must come from the file just written, not from memory.
    return ts.Context({"cache_pool": {"total_bytes_limit": 0}})


class _Stopped(Exception):
    """Another stream of the same ``write_image`` failed: this one stops (the other's error is raised)."""


def _stream_level0(arrays: Sequence[zarr.Array], source: Any, factors: Sequence[Sequence[int]],
                   method: Downsampling, what: str, on_block: Callable[[int], None] | None, backend: Backend,
                   verify: bool, stop: threading.Event | None = None) -> dict[str, Any]:
    """Write level 0 shard by shard from ``source``, read each shard back and compare, and build the pyramid.

    ``stop``: checked before each shard; once set, the stream cancels its writes and raises ``_Stopped``."""
    shape, dtype = _source_shape_dtype(source, what)
    context = _tensorstore_context() if backend == "tensorstore" else None
    # Upper levels hold 1/8 of the data or less: at most one shard held each, none where two shards would
    # exceed the in-flight budget (a 256^3 uint64 shard is 128 MiB: its write and read-back finish in ``put``).
    sinks = [_Sink(a, backend, verify, what, context) if i == 0 else
             _Sink(a, backend, verify, f"level {i} of {what}", context, max_depth=1, min_depth=0)
             for i, a in enumerate(arrays)]
    for sink in sinks[1:]:
        sink.depth = min(sink.depth, _Sink.INFLIGHT_BYTES // (2 * math.prod(sink.array.shards or sink.array.chunks)
                                                              * sink.array.dtype.itemsize))
    # Integer voxels are summed by the read-back as it compares (the same figure: see _Sink.sum_voxels).
    fold_sum = verify and backend == "tensorstore" and dtype.kind in "iu"
    sinks[0].sum_voxels = fold_sum
    blocks = [tuple(a.shards or a.chunks) for a in arrays]
    # A level-0 shard larger than the in-flight budget is written in pieces, one at a time (each write adds its
    # chunks to the shard file), each read back before the next; the pyramid reduces piece by piece.
    unit = write_unit(blocks[0], arrays[0].chunks, dtype.itemsize, _Sink.INFLIGHT_BYTES)
    if unit != blocks[0]:
        sinks[0].depth = 0
    boxes = shard_order(shape, factors, unit, blocks)
    builder = _StreamingPyramid(sinks, factors, method, unit)
    if isinstance(source, Blocks):
        datas: Iterator[np.ndarray] = iter(source.read(boxes))
    else:
        datas = (np.asarray(source[box]) for box in boxes)
    total = math.prod(shape) * dtype.itemsize
    began = last_log = time.monotonic()
    read_s = stats_s = 0.0
    done_bytes = 0
    total_sum = 0.0
    try:
        for n, box in enumerate(boxes, 1):
            if stop is not None and stop.is_set():
                raise _Stopped(what)
            t0 = time.monotonic()
            data = next(datas, None)
            read_s += time.monotonic() - t0
            expected = tuple(b.stop - b.start for b in box)
            if data is None:
                raise SourceMismatchError(f"{what}: the source ended after {n - 1} of {len(boxes)} blocks")
            if data.shape != expected or data.dtype != dtype:
                raise SourceMismatchError(f"{what}: block {box} is {data.shape} {data.dtype}, expected {expected} {dtype}")
            sinks[0].put(box, data)
            if not fold_sum:
                t0 = time.monotonic()
                total_sum += _exact_sum(data)
                stats_s += time.monotonic() - t0
            builder.add(1, [b.start for b in box], data)
            done_bytes += data.nbytes
            if on_block is not None:
                on_block(data.nbytes)
            del data  # the sink holds it while it must; then it is freed before the next shard arrives
            sinks[0].make_room()
            now = time.monotonic()
            if now - last_log >= PROGRESS_EVERY_S or n == len(boxes):
                rate = done_bytes / max(now - began, 1e-9)
                log.info("%s: %d/%d shards, %.0f of %.0f MB, %.1f MB/s, ETA %.0f s", what, n, len(boxes),
                         done_bytes / 1e6, total / 1e6, rate / 1e6, (total - done_bytes) / max(rate, 1e-9))
                last_log = now
        if next(datas, None) is not None:
            raise SourceMismatchError(f"{what}: the source yielded more than the {len(boxes)} blocks asked for")
        builder.finish(what)
        for sink in sinks:
            sink.flush()
        if fold_sum:
            total_sum = sinks[0].voxel_sum
    except BaseException:
        for sink in sinks:  # stop the writes and reads still in flight
            sink.cancel()
        raise
    finally:
        close = getattr(datas, "close", None)
        if close is not None:  # a generator reading ahead (Blocks) stops its reads
            close()
    seconds = time.monotonic() - began
    return {
        "shape": list(shape), "dtype": str(dtype), "levels": len(arrays), "backend": backend,
        "factors": [list(f) for f in factors], "bytes": done_bytes, "mean": total_sum / math.prod(shape),
        "seconds": round(seconds, 3), "read_seconds": round(read_s, 3),
        "write_seconds": round(sinks[0].seconds, 3), "pyramid_reduce_seconds": round(builder.seconds, 3),
        "pyramid_write_seconds": round(sum(s.seconds for s in sinks[1:]), 3),
        "stats_seconds": round(stats_s, 3), "pyramid_peak_bytes": builder.peak_bytes,
        "MBps": round(done_bytes / 1e6 / max(seconds, 1e-9), 1),
    }


def write_image(
    group: zarr.Group,
    *,
    name: str,
    source: Any,
    geometry: Geometry,
    what: str,
    chunks: Sequence[int] = DEFAULT_CHUNKS,
    shards: Sequence[int] | None = DEFAULT_SHARDS,
    method: Downsampling = "mean",
    labels: Sequence[Label] = (),
    attrs: Mapping[str, Any] | None = None,
    n_levels: int | None = None,
    factors: Sequence[Sequence[int]] | None = None,
    on_block: Callable[[int], None] | None = None,
    backend: Backend = "tensorstore",
    verify: bool = True,
    overlap_labels: bool = False,
) -> dict[str, Any]:
    """Write ``source`` as an OME-Zarr 0.5 image in ``group`` with its pyramid and labels; return figures.

    Level 0 is written one output shard at a time from ``source`` (array-like or ``Blocks``), each shard read
    back and compared (SourceMismatchError naming ``what`` and the box); the pyramid levels are built from
    those shards as they pass (no second read of level 0), in bounded memory. Levels follow
    ``pyramid.plan_factors`` (near-isotropic) unless ``factors`` (per level, level 0 first) or ``n_levels``
    is given. Each label is written the same way on the image's levels and shards. ``attrs`` are added to the
    group's attributes beside ``ome``. ``on_block`` is called with the bytes of each level-0 shard (progress bars).

    ``backend``: "tensorstore" (default; measured faster, bench/RESULTS_pyramid.md) or "zarr" (zarr-python).
    Both write the same zarr.json and the same compressed chunks and read back identically through
    zarr-python; only the order of chunks inside a shard file differs (C order vs zarr-python's Morton order).
    The read-back (``verify``, default) decodes every chunk written, at every level, from the shard file on disk
    (tensorstore backend: the file read whole, its index crc32c-checked, each chunk blosc-decoded; zarr
    backend: read through zarr-python) and compares it voxel for voxel with what was handed to the writer; a
    chunk that is not stored must be all fill value. ``verify=False`` skips it (~40% of a verified write's CPU).

    ``overlap_labels``: the labels are written on a second thread while the image is (each stream as it would
    be alone: its own shards, pyramid and read-back; both sources read at once), so that a stage waiting on
    remote reads keeps both cores busy; the in-flight memory of both streams adds up, and ``on_block`` is
    called from both threads. The output is the same either way. If one stream fails, the other stops before
    its next shard and the first error is raised.
    """
    method = pyramid.check_method(method)  # type: ignore[assignment]
    shape, dtype = _source_shape_dtype(source, what)
    if factors is None:
        factors = pyramid.plan_factors(shape, geometry.voxel_size_nm, n_levels=n_levels)
    factors = [tuple(int(v) for v in f) for f in factors]
    if not factors or factors[0] != (1, 1, 1) or any(v not in (1, 2) for f in factors for v in f):
        raise InvalidParameterError(f"factors must start with (1, 1, 1) and hold 1 or 2 per axis, got {factors}")
    names = [lab.name for lab in labels]
    if len(set(names)) != len(names) or any(not n or "/" in n for n in names):
        raise InvalidParameterError(f"label names must be unique, non-empty and without '/', got {names}")
    for lab in labels:
        pyramid.check_method(lab.method)
        lshape, _ = _source_shape_dtype(lab.source, f"label {lab.name!r} of {what}")
        if lshape != shape:
            raise InvalidParameterError(f"label {lab.name!r} of {what} has shape {lshape}, its image {shape}")
    arrays = create_multiscale(group, name=name, shape=shape, dtype=dtype, geometry=geometry, chunks=chunks,
                               shards=shards, downsampling=method, extra_attrs=dict(attrs) if attrs else None,
                               factors=factors)
    if backend not in BACKENDS:
        raise InvalidParameterError(f"backend must be one of {BACKENDS}, got {backend!r}")
    label_arrays = []
    for lab in labels:
        _, ldtype = _source_shape_dtype(lab.source, lab.name)
        label_arrays.append(create_label(group, lab.name, colors=lab.colors, properties=lab.properties,
                                         downsampling=lab.method, shape=shape, dtype=ldtype, geometry=geometry,
                                         chunks=chunks, shards=shards, factors=factors))
    stop = threading.Event()
    label_figures: dict[str, Any] = {}
    errors: list[BaseException] = []

    def write_labels() -> None:
        try:
            for lab, larrays in zip(labels, label_arrays, strict=True):
                label_figures[lab.name] = _stream_level0(larrays, lab.source, factors, lab.method,
                                                         f"label {lab.name!r} of {what}", on_block, backend, verify,
                                                         stop)
        except BaseException as exc:  # handed to the caller's thread
            errors.append(exc)
            stop.set()

    thread = None
    if overlap_labels and labels:
        thread = threading.Thread(target=write_labels, name="emdata-labels", daemon=True)
        thread.start()
    try:
        figures = _stream_level0(arrays, source, factors, method, what, on_block, backend, verify, stop)
    except BaseException as exc:
        stop.set()
        if thread is not None:
            thread.join()
        if isinstance(exc, _Stopped) and errors:
            raise errors[0] from None
        raise
    if thread is not None:
        thread.join()
    else:
        write_labels()
    if errors:
        raise errors[0]
    if labels:
        figures["labels"] = {lab.name: label_figures[lab.name] for lab in labels}
    return figures
