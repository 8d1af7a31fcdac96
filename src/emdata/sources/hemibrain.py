"""FlyEM hemibrain: a reproducible random crop of the grayscale (plus a segmentation) -> OME-Zarr 0.5.

The source is the ``emdata`` layer of the hemibrain Neuroglancer state,
``precomputed://gs://neuroglancer-janelia-flyem-hemibrain/emdata/clahe_yz/jpeg`` (uint8, JPEG, 8 nm, sharded),
read over its HTTPS form with tensorstore. Steps, all deterministic in ``seed``:

1. GET the EM ``info`` (and the segmentation's) and check every param against it, before any voxel is read.
   Every number of an ``info`` is bounded first (``emdata.formats.precomputed``).
2. Tissue selection: read one coarse EM scale whole (auto: the coarsest where the crop spans >= 4 voxels per
   axis, else the finest small enough to read whole). Tissue: grey values above ``background_max_value``
   (the noise near the tissue, JPEG-noisy values just above 0) that are also at least ``EDGE_CONTRAST`` of
   the brightest voxel within ``EDGE_REACH`` (JPEG rings at the tissue's edge far above the noise, but far
   below the tissue).
   The background is measured (histogram of the low values, noise median and 99th percentile, voxels refused
   as ringing) and recorded, with a warning when the noise reaches the threshold. Then draw from
   ``numpy.random.default_rng(seed)``: a tissue voxel of the coarse scale, then an origin whose window
   contains it, until the crop's window is at least ``min_tissue_fraction`` tissue. Drawing near tissue
   keeps the number of draws small even where tissue is a small part of the box (the real hemibrain box is
   mostly empty); accepted windows are all >= the fraction, so the choice is near-uniform among them.
3. Stream the crop one output shard (256 x 512 x 512, ``OUTPUT_SHARDS``) at a time, several in flight,
   into ``data/hemibrain_crop.zarr`` (z, y, x, nm; translation = global voxel index of the first voxel x
   resolution, Neuroglancer's convention, so the crop overlays the hemibrain), its mean pyramid built as the
   shards pass; with ``segmentation`` (default ``v1.0``) the same voxels of ``<version>/segmentation`` become
   ``labels/segmentation`` (uint64, mode pyramid), written at the same time.

A shard or chunk answering 403 stops the run with the object's URL: the bucket allows anonymous listing, so a
missing object answers 404 (read as empty space); a 403 means the object cannot be read (or, on a bucket
without anonymous listing, that a missing object cannot be told from a forbidden one), never empty space.

Why not the viewer's ``mask_normalized_round6`` layer for step 2: it is a segmentation layer of undocumented
meaning (the state highlights segment 2, nothing says which values are tissue) and it is not the data we
crop; the coarse EM itself says where the voxels are non-background and is served wherever the EM is.

Memory: one output shard per array in flight times the prefetch depth (``max_inflight_mb``), the coarse
selection volume (capped at 64 Mi voxels) and tensorstore's cache pool; never the whole crop. The EM and the
segmentation are written at the same time (``ngff.write_image(overlap_labels=True)``: the reads and serial
steps of one overlap the other's work), so both arrays' shards in flight add up (a 512^3 crop with segmentation:
peak RSS 611-615 MB written one after the other, 674-715 MB together; bench/README.md, "Hemibrain crop").
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import tensorstore as ts
import zarr

from emdata import ngff
from emdata.acquire.context import RunContext
from emdata.acquire.fsutil import atomic_dir
from emdata.acquire.params import check_number
from emdata.acquire.tsio import remote_blocks, ts_result
from emdata.acquire.urls import redact
from emdata.catalog import find
from emdata.errors import DownloadError, InvalidParameterError, SourceMismatchError
from emdata.formats.precomputed import ScaleInfo, VolumeInfo, parse_info
from emdata.sources.base import Provenance, SourceBase, output_path

log = logging.getLogger(__name__)
T = TypeVar("T")

BUCKET_URL = "https://storage.googleapis.com/neuroglancer-janelia-flyem-hemibrain"
EM_URL = f"{BUCKET_URL}/emdata/clahe_yz/jpeg"
EM_LAYER = "precomputed://gs://neuroglancer-janelia-flyem-hemibrain/emdata/clahe_yz/jpeg"
DEFAULT_SEGMENTATION = "v1.0"  # the release whose segmentation ``info`` we hold verbatim
SEGMENTATION_VERSION = re.compile(r"v\d{1,3}(\.\d{1,3}){0,2}")  # v1.0, v1.1, v1.2 were published


def segmentation_url(version: str) -> str:
    """The live HTTPS URL of a release's segmentation (``v1.0`` -> ``.../v1.0/segmentation``)."""
    return f"{BUCKET_URL}/{version}/segmentation"


def segmentation_layer(version: str) -> str:
    return f"precomputed://gs://neuroglancer-janelia-flyem-hemibrain/{version}/segmentation"


SEGMENTATION_URL = segmentation_url(DEFAULT_SEGMENTATION)

OUTPUT_CHUNKS = (64, 64, 64)
# Shards of 256 x 512 x 512 at every level, EM and segmentation (64 MiB of uint8, ngff.UINT8_SHARDS; the uint64
# segmentation's 512 MiB decoded are a few MB stored, written in 256^3 pieces: ngff.write_unit): few files for
# DVC (55 for the 1000^3 crop and its segmentation; 163 with 256^3 shards, 1,185 with 128^3). The streaming
# pyramid holds a bounded number of pieces (bench/bench_memory.py).
OUTPUT_SHARDS = ngff.UINT8_SHARDS
MIN_SELECTION_VOXELS = 4  # auto selection scale: the coarsest where the crop spans at least this per axis
MAX_SELECTION_VOXELS = 2**26  # the coarse volume read whole for tissue selection (64 Mi voxels)
EDGE_CONTRAST = 0.3  # coarse tissue is at least this fraction of the brightest voxel near it (JPEG ringing is not)
EDGE_REACH = 7  # voxels: how far JPEG ringing reaches from an edge (within its 8x8 block)
CACHE_BYTES = 64 * 2**20  # tensorstore cache: shard indices and chunks shared by neighbouring blocks
ABOUT = find("hemibrain").about  # title, page, licence, citation, DOI (emdata.catalog)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class HemibrainParams:
    """params.yaml section ``hemibrain``; every vector is z, y, x (precomputed itself is x, y, z)."""

    seed: int
    crop_size: Sequence[int] = (1000, 1000, 1000)  # voxels at ``scale``
    level: int = 0  # index into the EM info's scales (0 = 8 nm)
    min_tissue_fraction: float = 0.9
    segmentation: str | None = DEFAULT_SEGMENTATION  # release of <version>/segmentation; null or false: none
    selection_level: int | str = "auto"  # EM scale index for the tissue check
    background_max_value: int = 10  # coarse grey values at or below this are background
    origin_step: int = 64  # origins are voxel_offset + multiples of this (64 = chunk-aligned)
    max_attempts: int = 10000
    concurrency: int = 64  # HTTP requests in flight
    max_inflight_mb: float = 128.0  # decoded voxels requested ahead of the writer, per array

    def __post_init__(self) -> None:
        if not _is_int(self.seed) or self.seed < 0:
            raise InvalidParameterError(f"hemibrain.seed must be an integer >= 0, got {self.seed!r}")
        crop = self.crop_size
        if not isinstance(crop, (list, tuple)) or len(crop) != 3 or not all(_is_int(c) and c > 0 for c in crop):
            raise InvalidParameterError(
                f"hemibrain.crop_size must be three positive integers (z, y, x voxels), got {crop!r}")
        object.__setattr__(self, "crop_size", tuple(crop))
        if not _is_int(self.level) or self.level < 0:
            raise InvalidParameterError(f"hemibrain.level must be an integer >= 0, got {self.level!r}")
        sel = self.selection_level
        if sel != "auto" and not (_is_int(sel) and sel >= 0):  # type: ignore[operator]
            raise InvalidParameterError(
                f"hemibrain.selection_level must be 'auto' or an integer >= 0, got {sel!r}")
        f = self.min_tissue_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
            raise InvalidParameterError(f"hemibrain.min_tissue_fraction must be a number in [0, 1], got {f!r}")
        seg = self.segmentation
        if seg is False:
            object.__setattr__(self, "segmentation", None)
        elif seg is not None and not (isinstance(seg, str) and SEGMENTATION_VERSION.fullmatch(seg)):
            raise InvalidParameterError(
                f"hemibrain.segmentation must be a release such as 'v1.0' (read from <release>/segmentation), "
                f"or null/false for none, got {seg!r}")
        b = self.background_max_value
        if not _is_int(b) or not 0 <= b < 255:
            raise InvalidParameterError(f"hemibrain.background_max_value must be an integer in [0, 254], got {b!r}")
        for name, lo, hi in (("origin_step", 1, 2**20), ("max_attempts", 1, 10**7), ("concurrency", 1, 1024)):
            check_number(f"hemibrain.{name}", getattr(self, name), kind=int, low=lo, high=hi, low_open=False)
        check_number("hemibrain.max_inflight_mb", self.max_inflight_mb, low=0, high=2**16)


@dataclass(frozen=True)
class CropPlan:
    """Everything decided before the first voxel of the crop is read (all vectors z, y, x)."""

    em: VolumeInfo
    em_info: dict[str, Any]
    em_scale: ScaleInfo
    selection_scale: ScaleInfo
    selection_note: str | None  # why the selection scale is coarser than the auto rule wants, if it is
    segmentation_version: str | None
    segmentation: VolumeInfo | None
    segmentation_info: dict[str, Any] | None
    segmentation_scale: ScaleInfo | None
    origin_lo: tuple[int, int, int]  # inclusive range of allowed origins (global voxels at em_scale)
    origin_hi: tuple[int, int, int]

    @property
    def segmentation_url(self) -> str | None:
        return None if self.segmentation_version is None else segmentation_url(self.segmentation_version)


@dataclass(frozen=True)
class Selection:
    origin: tuple[int, int, int]  # global voxel index (z, y, x) at the crop's scale
    tissue_fraction: float
    attempts: int


@dataclass(frozen=True)
class Background:
    """What the coarse selection scale says about the background (grey values at or below the threshold)."""

    threshold: int
    voxels: int
    tissue_fraction: float  # of the coarse scale's voxels above the threshold
    zero_fraction: float  # exactly 0: absent chunks (fill) and empty space
    noise_fraction: float  # 1..threshold: the noisy background (JPEG, resin) near the tissue
    noise_p50: int | None
    noise_p99: int | None
    noise_max: int | None
    low_value_counts: list[int]  # voxels per grey value 0 .. 2 * threshold + 1
    edge_voxels_refused: int = 0  # above the threshold but refused as JPEG ringing by the contrast rule

    @property
    def reaches_threshold(self) -> bool:
        """The bulk of the noise (its median) sits at half the threshold or above: noise likely exceeds it too."""
        return self.noise_p50 is not None and 2 * self.noise_p50 >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "voxels": self.voxels, "tissue_fraction": round(self.tissue_fraction, 6),
                "zero_fraction": round(self.zero_fraction, 6), "noise_fraction": round(self.noise_fraction, 6),
                "noise_p50": self.noise_p50, "noise_p99": self.noise_p99, "noise_max": self.noise_max,
                "reaches_threshold": self.reaches_threshold, "low_value_counts": self.low_value_counts,
                "edge_contrast": EDGE_CONTRAST, "edge_reach": EDGE_REACH,
                "edge_voxels_refused": self.edge_voxels_refused}


def _histogram_uint8(values: np.ndarray, step: int = 1 << 16) -> np.ndarray:
    """Voxels per value 0..255 of a uint8 array (``np.bincount`` in slices of ``step``: each slice's
    conversion to intp stays in cache; half the time of one ``np.bincount`` of 27 M voxels)."""
    flat = np.ascontiguousarray(values).reshape(-1)
    hist = np.zeros(256, np.int64)
    for i in range(0, flat.size, step):
        hist += np.bincount(flat[i:i + step], minlength=256)
    return hist


def measure_background(coarse_em: np.ndarray, threshold: int, edge_voxels_refused: int = 0) -> Background:
    """The background of a coarse uint8 scale, from its histogram: exact zeros vs noise in 1..``threshold``."""
    hist = _histogram_uint8(coarse_em)
    n = int(hist.sum())
    noise = hist[1:threshold + 1]
    total_noise = int(noise.sum())

    def percentile(q: float) -> int | None:
        if total_noise == 0:
            return None
        return int(1 + np.searchsorted(np.cumsum(noise), q * total_noise))

    return Background(
        threshold=threshold, voxels=n, tissue_fraction=float(hist[threshold + 1:].sum()) / max(n, 1),
        zero_fraction=float(hist[0]) / max(n, 1), noise_fraction=total_noise / max(n, 1),
        noise_p50=percentile(0.5), noise_p99=percentile(0.99),
        noise_max=int(np.flatnonzero(noise).max() + 1) if total_noise else None,
        low_value_counts=[int(c) for c in hist[:min(256, 2 * threshold + 2)]], edge_voxels_refused=edge_voxels_refused)


def plan_crop(params: HemibrainParams, em_doc: Mapping[str, Any], seg_doc: Mapping[str, Any] | None) -> CropPlan:
    """Check the params against the ``info`` documents; InvalidParameterError names any value that cannot work."""
    em = parse_info(em_doc, EM_URL)
    if em.data_type != "uint8" or em.num_channels != 1:
        raise SourceMismatchError(f"{EM_URL}/info: expected 1-channel uint8, got {em.num_channels} x {em.data_type}")
    n = len(em.scales)
    if params.level >= n:
        raise InvalidParameterError(
            f"hemibrain.level {params.level} does not exist: the EM volume has scales 0..{n - 1} "
            f"({', '.join(s.key for s in em.scales)})")
    scale = em.scales[params.level]
    crop = tuple(params.crop_size)
    if any(c > s for c, s in zip(crop, scale.size, strict=True)):
        raise InvalidParameterError(
            f"hemibrain.crop_size {list(crop)} (z, y, x) is larger than the volume at {scale.describe()}")
    lo: tuple[int, ...] = scale.voxel_offset
    hi = tuple(e - c for e, c in zip(scale.end, crop, strict=True))
    seg = seg_scale = None
    if seg_doc is not None:
        assert params.segmentation is not None
        url = segmentation_url(params.segmentation)
        seg = parse_info(seg_doc, url)
        if seg.data_type != "uint64" or seg.num_channels != 1:
            raise SourceMismatchError(
                f"{url}/info: expected 1-channel uint64, got {seg.num_channels} x {seg.data_type}")
        seg_scale = seg.scale_with_resolution(scale.resolution_nm)
        if seg_scale is None:
            raise SourceMismatchError(
                f"{url}/info has no scale at {list(scale.resolution_nm)} nm (z, y, x) to match EM "
                f"{scale.describe()}; set hemibrain.segmentation: null or another hemibrain.level")
        lo = tuple(max(a, b) for a, b in zip(lo, seg_scale.voxel_offset, strict=True))
        hi = tuple(min(a, e - c) for a, e, c in zip(hi, seg_scale.end, crop, strict=True))
        if any(a > b for a, b in zip(lo, hi, strict=True)):
            raise InvalidParameterError(
                f"hemibrain.crop_size {list(crop)} (z, y, x) does not fit where the EM {scale.describe()} and the "
                f"segmentation {seg_scale.describe()} overlap")
    selection, note = _selection_scale(params, em, scale)
    step_lo, step_hi = _step_range(lo, hi, scale.voxel_offset, params.origin_step)  # type: ignore[arg-type]
    if any(a > b for a, b in zip(step_lo, step_hi, strict=True)):
        raise InvalidParameterError(
            f"hemibrain.origin_step {params.origin_step}: no origin on that grid fits crop_size {list(crop)}")
    return CropPlan(em=em, em_info=dict(em_doc), em_scale=scale, selection_scale=selection, selection_note=note,
                    segmentation_version=params.segmentation if seg_doc is not None else None, segmentation=seg,
                    segmentation_info=dict(seg_doc) if seg_doc is not None else None,
                    segmentation_scale=seg_scale, origin_lo=lo, origin_hi=hi)  # type: ignore[arg-type]


def _selection_scale(params: HemibrainParams, em: VolumeInfo, scale: ScaleInfo) -> tuple[ScaleInfo, str | None]:
    if params.selection_level == "auto":
        readable = [s for s in em.scales if math.prod(s.size) <= MAX_SELECTION_VOXELS]
        if not readable:
            raise InvalidParameterError(
                f"hemibrain.selection_level 'auto': no EM scale is small enough to read whole "
                f"(<= {MAX_SELECTION_VOXELS} voxels)")
        candidates = [s for s in readable
                      if all(c * r / rc >= MIN_SELECTION_VOXELS for c, r, rc in
                             zip(params.crop_size, scale.resolution_nm, s.resolution_nm, strict=True))]
        if candidates:
            return max(candidates, key=lambda s: math.prod(s.resolution_nm)), None
        # A crop smaller than a few voxels of every readable scale: the finest one still says which coarse
        # voxels are tissue; the window is coarser than the crop (stricter, never looser).
        finest = min(readable, key=lambda s: math.prod(s.resolution_nm))
        note = (f"crop_size {list(params.crop_size)} spans fewer than {MIN_SELECTION_VOXELS} voxels per axis of "
                f"every EM scale small enough to read whole; the finest such scale ({finest.describe()}) is used")
        log.warning("hemibrain: %s", note)
        return finest, note
    index = int(params.selection_level)
    if index >= len(em.scales):
        raise InvalidParameterError(
            f"hemibrain.selection_level {index} does not exist: the EM volume has scales 0..{len(em.scales) - 1}")
    chosen = em.scales[index]
    if math.prod(chosen.size) > MAX_SELECTION_VOXELS:
        raise InvalidParameterError(
            f"hemibrain.selection_level {index} is too large to read whole ({math.prod(chosen.size)} voxels > "
            f"{MAX_SELECTION_VOXELS}); choose a coarser scale or 'auto'")
    return chosen, None


def _step_range(lo: Sequence[int], hi: Sequence[int], offset: Sequence[int], step: int) -> tuple[list[int], list[int]]:
    """Range of m such that offset + m * step lies in [lo, hi], per axis."""
    return ([-((o - a) // step) for a, o in zip(lo, offset, strict=True)],
            [(b - o) // step for b, o in zip(hi, offset, strict=True)])


def tissue_window_fraction(integral: np.ndarray, coarse: ScaleInfo, scale: ScaleInfo, origin: Sequence[int],
                           crop: Sequence[int]) -> float:
    """Fraction of tissue in the coarse voxels covering ``crop`` at ``origin`` (outside the volume = background).

    ``integral`` is the zero-padded 3-D cumulative sum of the coarse tissue mask (z, y, x).
    """
    lo, hi, clo, chi = [], [], [], []
    for a, c, r, rc, off, n in zip(origin, crop, scale.resolution_nm, coarse.resolution_nm, coarse.voxel_offset,
                                   coarse.size, strict=True):
        # Precomputed voxel i covers [i * r, (i + 1) * r) nm.
        g0, g1 = math.floor(a * r / rc), math.ceil((a + c) * r / rc)
        lo.append(g0)
        hi.append(g1)
        clo.append(min(max(g0 - off, 0), n))
        chi.append(min(max(g1 - off, 0), n))
    total = math.prod(b - a for a, b in zip(lo, hi, strict=True))
    (z0, y0, x0), (z1, y1, x1) = clo, chi
    s = (integral[z1, y1, x1] - integral[z0, y1, x1] - integral[z1, y0, x1] - integral[z1, y1, x0]
         + integral[z0, y0, x1] + integral[z0, y1, x0] + integral[z1, y0, x0] - integral[z0, y0, x0])
    return float(s) / total


def tissue_integral(coarse_em: np.ndarray, background_max_value: int) -> np.ndarray:
    """The zero-padded 3-D cumulative sum of ``coarse_em > background_max_value``."""
    return mask_integral(coarse_em > background_max_value)


def mask_integral(tissue: np.ndarray) -> np.ndarray:
    integral = np.zeros(tuple(n + 1 for n in tissue.shape), dtype=np.int32)
    integral[1:, 1:, 1:] = tissue.cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32).cumsum(2, dtype=np.int32)
    return integral


def tissue_mask(coarse_em: np.ndarray, background_max_value: int) -> tuple[np.ndarray, int]:
    """Coarse tissue: above the threshold and at least ``EDGE_CONTRAST`` of the brightest voxel within
    ``EDGE_REACH`` voxels. Returns the mask and how many voxels above the threshold the contrast rule refused.

    JPEG rings at the tissue's edge, within its 8x8 block: next to tissue of grey ~130, the coarse background
    reaches ~25 (replica; the real volume's coarse scales are JPEG too), far above a noise threshold of 10 but
    far below the tissue nearby. Tissue itself varies much less at this scale (CLAHE-equalised, averaged).
    """
    from scipy import ndimage

    above = coarse_em > background_max_value
    tissue = np.zeros_like(above)
    if not above.any():
        return tissue, 0
    # Only the box around the voxels above the threshold (and the reach of their neighbours) matters.
    box = _bounds(above)
    region = coarse_em[box]
    brightest = region
    for axis in range(3):  # a box maximum is separable
        brightest = ndimage.maximum_filter1d(brightest, 2 * EDGE_REACH + 1, axis=axis, mode="constant", cval=0)
    tissue[box] = above[box] & (region >= np.ceil(EDGE_CONTRAST * brightest.astype(np.float32)).astype(np.uint8))
    return tissue, int(above.sum() - tissue.sum())


def _bounds(mask: np.ndarray, margin: int = EDGE_REACH) -> tuple[slice, ...]:
    """The bounding box of ``mask``'s true voxels (at least one), widened by ``margin`` (clipped to the array)."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hits[0]) - margin, 0), int(hits[-1]) + margin + 1))
    return tuple(box)


def _tissue_voxel(integral: np.ndarray, k: int) -> tuple[int, int, int]:
    """The ``k``-th tissue voxel (C order) of the coarse mask behind ``integral``."""
    per_z = integral[1:, -1, -1] - integral[:-1, -1, -1]  # tissue voxels per z slice
    z = int(np.searchsorted(np.cumsum(per_z), k, side="right"))
    k -= int(integral[z, -1, -1])
    plane = integral[z + 1, 1:, 1:] - integral[z, 1:, 1:]  # cumulative over y, x of slice z
    rows = plane[:, -1] - np.concatenate(([0], plane[:-1, -1]))  # tissue voxels per y row
    y = int(np.searchsorted(np.cumsum(rows), k, side="right"))
    k -= int(plane[y - 1, -1]) if y else 0
    row = plane[y] - (plane[y - 1] if y else 0)  # cumulative over x of row y
    x = int(np.searchsorted(row, k, side="right"))
    return z, y, x


def choose_origin(params: HemibrainParams, plan: CropPlan, integral: np.ndarray,
                  coarse: ScaleInfo | None = None) -> Selection:
    """Draw origins from the seed until one lands in tissue; the same seed and info give the same origin.

    Each draw picks a tissue voxel of the coarse scale uniformly, then an origin on the ``origin_step`` grid
    uniformly among those whose window contains it; the window's tissue fraction decides. ``integral`` covers
    ``coarse`` (default: the whole selection scale; a box of it holding every tissue voxel gives the same draws).
    """
    rng = np.random.default_rng(params.seed)
    scale, coarse = plan.em_scale, coarse or plan.selection_scale
    offset, step = scale.voxel_offset, params.origin_step
    m_lo, m_hi = _step_range(plan.origin_lo, plan.origin_hi, offset, step)
    total = int(integral[-1, -1, -1])
    if total == 0:
        raise InvalidParameterError(
            f"hemibrain.background_max_value {params.background_max_value}: no voxel of EM {coarse.describe()} "
            "counts as tissue (above it, and not JPEG ringing at an edge), so there is nothing to crop; check the "
            "EM URL or lower the threshold")
    best = 0.0
    for attempt in range(1, params.max_attempts + 1):
        voxel = _tissue_voxel(integral, int(rng.integers(total)))
        lo, hi = [], []
        for g, off_c, rc, r, c, o, a, b in zip(voxel, coarse.voxel_offset, coarse.resolution_nm, scale.resolution_nm,
                                               params.crop_size, offset, m_lo, m_hi, strict=True):
            # Origins whose window [floor(t r / rc), ceil((t + c) r / rc)) holds coarse voxel G = g + off_c.
            first = math.floor((g + off_c) * rc / r - c) + 1
            last = math.ceil((g + off_c + 1) * rc / r) - 1
            lo.append(max(a, -((o - first) // step)))
            hi.append(min(b, (last - o) // step))
        if any(a > b for a, b in zip(lo, hi, strict=True)):
            continue  # this tissue voxel is not in the window of any allowed origin
        m = rng.integers(lo, np.asarray(hi) + 1)
        origin = tuple(int(o + k * step) for o, k in zip(offset, m, strict=True))
        fraction = tissue_window_fraction(integral, coarse, scale, origin, params.crop_size)
        best = max(best, fraction)
        if fraction >= params.min_tissue_fraction:
            return Selection(origin, fraction, attempt)  # type: ignore[arg-type]
    raise InvalidParameterError(
        f"hemibrain.min_tissue_fraction {params.min_tissue_fraction}: no crop of {list(params.crop_size)} reached it "
        f"in {params.max_attempts} attempts from seed {params.seed} (best {best:.3f}); lower it, shrink crop_size "
        f"or raise max_attempts")


def provenance(params: HemibrainParams, plan: CropPlan, sel: Selection, background: Background,
               origin: str) -> Provenance:
    """The output's ``emdata`` attributes: live URLs only (never the mirror), nothing time-dependent."""
    scale = plan.em_scale
    origin_nm = [o * r for o, r in zip(sel.origin, scale.resolution_nm, strict=True)]
    labels = None
    if plan.segmentation_version is not None and plan.segmentation_scale is not None:
        labels = {"segmentation": {
            "release": plan.segmentation_version, "layer": segmentation_layer(plan.segmentation_version),
            "source_url": plan.segmentation_url, "level": plan.segmentation_scale.index,
            "scale_key": plan.segmentation_scale.key, "info": plan.segmentation_info,
            "values": f"neuron body ids of the {plan.segmentation_version} segmentation (uint64); 0 = no body",
        }}
    selection: dict[str, Any] = {
        "method": "coarse EM tissue fraction (tissue: above background_max_value and at least edge_contrast of "
                  "the brightest voxel within edge_reach); numpy.random.default_rng(seed) draws a tissue voxel of the "
                  "coarse scale, then an origin whose window holds it, until the window is min_tissue_fraction "
                  "tissue",
        "level": plan.selection_scale.index,
        "scale_key": plan.selection_scale.key,
        "background_max_value": params.background_max_value,
        "min_tissue_fraction": params.min_tissue_fraction,
        "tissue_fraction": round(sel.tissue_fraction, 6),
        "attempts": sel.attempts,
        "origin_step": params.origin_step,
        "background": background.to_dict(),
    }
    if plan.selection_note:
        selection["note"] = plan.selection_note
    details = {
        "layer": EM_LAYER,
        "source_url": EM_URL,
        "seed": params.seed,
        "level": scale.index,
        "scale_key": scale.key,
        "crop_size_voxels": list(params.crop_size),
        "crop_origin_voxels": list(sel.origin),
        "crop_origin_nm": origin_nm,
        "crop_origin_note": "global voxel index (z, y, x) of the crop's first voxel at `level`, including the "
                            "scale's voxel_offset; nm = index x resolution (Neuroglancer's convention, also the "
                            "OME-Zarr translation)",
        "crop_origin_xyz_voxels": list(reversed(sel.origin)),
        "selection": selection,
        "info": plan.em_info,
    }
    return Provenance(dataset="hemibrain", about=ABOUT, origin=origin, voxel_size_nm=scale.resolution_nm,
                      labels=labels, details=details)


class HemibrainSource(SourceBase[HemibrainParams]):
    name = "hemibrain"
    params_type = HemibrainParams


    def run(self, params: HemibrainParams, ctx: RunContext) -> dict[str, Any]:
        return fetch_hemibrain_crop(params, ctx, output_path(self.name, ctx))


def open_scale(ctx: RunContext, live_url: str, scale: int, context: ts.Context, what: str) -> ts.TensorStore:
    """Scale ``scale`` of the precomputed volume at ``live_url`` as a read-only z, y, x view.

    Indices of the view are global voxel coordinates, like the ``info``: the first voxel is at
    ``voxel_offset``. Sharded and unsharded scales read the same way (tensorstore resolves shard and minishard
    indices with HTTP Range requests).
    """
    store = ctx.open_tensorstore({"driver": "neuroglancer_precomputed", "scale_index": int(scale)}, live_url,
                                 context, f"{what} scale {scale}")
    return store[ts.d["channel"][0]].T  # x, y, z, channel -> z, y, x


_FORBIDDEN = re.compile(r"PERMISSION_DENIED|\[HTTP code 403\]")
_URL = re.compile(r"https?://[^\s'\"]+?(?=:?\s|'|\"|$)")


def forbidden_object_error(exc: DownloadError, ctx: RunContext, live_urls: Sequence[str]) -> DownloadError | None:
    """A DownloadError naming the object that answered 403 and what that means, or None for other errors.

    tensorstore reads a missing object as fill only on 404; a 403 must not become a crop with a hole.
    """
    text = str(exc)
    if not _FORBIDDEN.search(text):
        return None
    fetched = [u.rstrip(".,;") for u in _URL.findall(text)]
    named = []
    for url in dict.fromkeys(fetched):
        for live in live_urls:
            base = ctx.url(live)
            if url.startswith(base + "/"):
                named.append(live + url[len(base):] + ("" if url == live + url[len(base):]
                                                       else f" (fetched as {redact(url)})"))
                break
        else:
            named.append(redact(url))
    where = ", ".join(named) or "an object of " + " or ".join(live_urls)
    return DownloadError(
        f"{where} answered 403 Forbidden. The hemibrain bucket allows anonymous listing, so a missing shard or "
        "chunk answers 404 and reads as empty space; 403 means the object exists but cannot be read "
        "anonymously, or the bucket no longer allows listing, where a missing object cannot be told from a "
        "forbidden one. Either way its voxels are unknown: nothing was written. Check the URL (e.g. `gsutil "
        f"ls` or a browser) and the bucket's access. ({text[:300]})")


def _read_or_explain(ctx: RunContext, live_urls: Sequence[str], read: Any) -> Any:
    try:
        return read()
    except DownloadError as exc:
        explained = forbidden_object_error(exc, ctx, live_urls)
        if explained is not None:
            raise explained from exc
        raise


def _start(fn: Callable[..., T], *args: Any) -> Future[T]:
    """``fn(*args)`` on a daemon thread (a request that stalls never holds the process at exit): its Future."""
    future: Future[T] = Future()

    def run() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # raised where the result is asked for
                future.set_exception(exc)

    threading.Thread(target=run, name=f"emdata-{getattr(fn, '__name__', 'task')}", daemon=True).start()
    return future


def fetch_hemibrain_crop(params: HemibrainParams, ctx: RunContext, out: Path) -> dict[str, Any]:
    """Choose the crop from the seed and write it (and its segmentation) to ``out`` atomically."""
    began = time.monotonic()
    fetch = ctx.downloader(progress=False)
    seg_url = segmentation_url(params.segmentation) if params.segmentation is not None else None
    # What only waits runs beside the work that needs it: the segmentation's info beside the EM's, the level-0
    # stores' opens (an info request each) beside the tissue selection, the background histogram beside the
    # tissue mask (the same requests and results; the write starts ~0.1-0.15 s sooner, bench/README.md).
    seg_info = _start(fetch.fetch_json, f"{seg_url}/info") if seg_url is not None else None
    em_doc = fetch.fetch_json(f"{EM_URL}/info")
    seg_doc = seg_info.result() if seg_info is not None else None
    plan = plan_crop(params, em_doc, seg_doc)  # every check against the info: before any voxel is read
    scale = plan.em_scale
    volumes = [EM_URL] + ([seg_url] if seg_url is not None else [])
    log.info("hemibrain: crop %s (z, y, x) of EM %s; tissue check at %s", list(params.crop_size),
             scale.describe(), plan.selection_scale.describe())

    context = ctx.tensorstore_context(concurrency=params.concurrency, cache_bytes=CACHE_BYTES)
    opening = {EM_URL: _start(open_scale, ctx, EM_URL, scale.index, context, "hemibrain EM")}
    if plan.segmentation_scale is not None and seg_url is not None:
        opening[seg_url] = _start(open_scale, ctx, seg_url, plan.segmentation_scale.index, context,
                                  "hemibrain segmentation")
    t0 = time.monotonic()
    selection_view = open_scale(ctx, EM_URL, plan.selection_scale.index, context, "hemibrain EM")
    policy = ctx.read_policy
    coarse = _read_or_explain(ctx, [EM_URL], lambda: ts_result(
        selection_view.read(), f"hemibrain EM selection level {plan.selection_scale.index}", policy.timeout_s))
    measuring = _start(measure_background, coarse, params.background_max_value)
    tissue, refused = tissue_mask(coarse, params.background_max_value)
    background = dataclasses.replace(measuring.result(), edge_voxels_refused=refused)
    del coarse
    if background.reaches_threshold:
        log.warning("hemibrain: the background noise of EM %s reaches background_max_value %d (median of the "
                    "values 1..%d is %s): noise may count as tissue; raise hemibrain.background_max_value",
                    plan.selection_scale.describe(), params.background_max_value, params.background_max_value,
                    background.noise_p50)
    # The integral of the box holding the tissue is all the draws need (outside it nothing is tissue).
    box = _bounds(tissue, 0) if tissue.any() else tuple(slice(0, 1) for _ in range(3))
    within = dataclasses.replace(
        plan.selection_scale, voxel_offset=tuple(o + b.start for o, b in zip(
            plan.selection_scale.voxel_offset, box, strict=True)),  # type: ignore[arg-type]
        size=tuple(b.stop - b.start for b in box))  # type: ignore[arg-type]
    integral = mask_integral(tissue[box])
    del tissue
    sel = choose_origin(params, plan, integral, within)
    selection_s = time.monotonic() - t0
    origin_nm = [o * r for o, r in zip(sel.origin, scale.resolution_nm, strict=True)]
    log.info("hemibrain: origin %s voxels = %s nm (z, y, x), tissue %.3f after %d draw(s); background: %.3f "
             "zero, noise p99 %s (threshold %d)", list(sel.origin), origin_nm, sel.tissue_fraction, sel.attempts,
             background.zero_fraction, background.noise_p99, params.background_max_value)

    geometry = ngff.Geometry(scale.resolution_nm, tuple(origin_nm))  # type: ignore[arg-type]
    budget = params.max_inflight_mb * 2**20

    def blocks(live_url: str, dtype: Any, what: str) -> ngff.Blocks:
        view = opening[live_url].result()
        return remote_blocks(view, params.crop_size, sel.origin, dtype=dtype, max_inflight_bytes=budget, what=what,
                             policy=policy)

    labels = []
    if plan.segmentation_scale is not None and seg_url is not None:
        labels.append(ngff.Label("segmentation", blocks(seg_url, np.uint64, "hemibrain segmentation"), method="mode"))

    def write() -> Any:
        with atomic_dir(out) as tmp:
            root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            result = ngff.write_image(
                root, name="hemibrain_crop", source=blocks(EM_URL, np.uint8, "hemibrain EM"),
                geometry=geometry, chunks=OUTPUT_CHUNKS, shards=OUTPUT_SHARDS,
                method="mean", labels=labels, what="hemibrain EM", overlap_labels=True)
            root.attrs["emdata"] = provenance(params, plan, sel, background, ctx.origin).to_dict()
        return result

    written = _read_or_explain(ctx, volumes, write)
    seconds = time.monotonic() - began
    em_bytes = math.prod(params.crop_size)
    return {
        "seed": params.seed,
        "level": scale.index,
        "crop_size_voxels": list(params.crop_size),
        "crop_origin_voxels": list(sel.origin),
        "crop_origin_nm": origin_nm,
        "tissue_fraction": round(sel.tissue_fraction, 6),
        "selection_attempts": sel.attempts,
        "selection_level": plan.selection_scale.index,
        "selection_seconds": round(selection_s, 3),
        "background_zero_fraction": round(background.zero_fraction, 6),
        "background_noise_p50": background.noise_p50,
        "background_noise_p99": background.noise_p99,
        "background_edge_voxels_refused": background.edge_voxels_refused,
        "background_reaches_threshold": background.reaches_threshold,
        "segmentation": plan.segmentation_version if plan.segmentation_scale is not None else None,
        "write": written,
        "em_MBps_end_to_end": round(em_bytes / 1e6 / max(seconds, 1e-9), 1),
        "seconds": round(seconds, 2),
    }


SOURCE = HemibrainSource()
