"""FlyEM hemibrain: a reproducible random crop of the grayscale (plus its v1.0 segmentation) -> OME-Zarr 0.5.

The source is the ``emdata`` layer of the hemibrain Neuroglancer state,
``precomputed://gs://neuroglancer-janelia-flyem-hemibrain/emdata/clahe_yz/jpeg`` (uint8, JPEG, 8 nm), read over
its HTTPS form with tensorstore. Steps, all deterministic in ``seed``:

1. GET the EM ``info`` (and the segmentation's) and check every param against it, before any voxel is read.
2. Tissue selection: read one coarse EM scale whole (auto: the coarsest where the crop spans >= 4 voxels per
   axis), mark grey values above ``background_max_value`` as tissue, and draw origins from
   ``numpy.random.default_rng(seed)`` until the crop's window is at least ``min_tissue_fraction`` tissue.
3. Stream the crop one output shard (128^3) at a time, several in flight, into ``data/hemibrain_crop.zarr``
   (z, y, x, nm; translation = global voxel index of the first voxel x resolution, Neuroglancer's convention,
   so the crop overlays the hemibrain), then its mean pyramid; with ``with_segmentation`` the same voxels of
   ``v1.0/segmentation`` become ``labels/segmentation`` (uint64, nearest pyramid).

Why not the viewer's ``mask_normalized_round6`` layer for step 2: it is a segmentation layer of undocumented
meaning (the state highlights segment 2, nothing says which values are tissue) and it is not the data we
crop; the coarse EM itself says where the voxels are non-background and is served wherever the EM is.

Memory: one output shard per array in flight times the prefetch depth (``max_inflight_mb``), the coarse
selection volume (capped at 64 Mi voxels) and tensorstore's cache pool; never the whole crop.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts
import zarr

from emdata import ngff
from emdata.acquire.context import RunContext
from emdata.acquire.fsutil import atomic_dir
from emdata.acquire.params import dataclass_from_section
from emdata.acquire.tsio import remote_blocks, ts_result
from emdata.errors import InvalidParameterError, SourceMismatchError
from emdata.formats.precomputed import ScaleInfo, VolumeInfo, parse_info
from emdata.sources.base import About, Provenance, output_path

log = logging.getLogger(__name__)

BUCKET_URL = "https://storage.googleapis.com/neuroglancer-janelia-flyem-hemibrain"
EM_URL = f"{BUCKET_URL}/emdata/clahe_yz/jpeg"
SEGMENTATION_URL = f"{BUCKET_URL}/v1.0/segmentation"
EM_LAYER = "precomputed://gs://neuroglancer-janelia-flyem-hemibrain/emdata/clahe_yz/jpeg"
SEGMENTATION_LAYER = "precomputed://gs://neuroglancer-janelia-flyem-hemibrain/v1.0/segmentation"

OUTPUT_CHUNKS = (64, 64, 64)
# 128^3 shards: the pyramid writer reads a 256^3 block per output shard, which for uint64 labels is 128 MiB
# (and 64 MiB of float32 for the EM's mean); larger shards would multiply that by 8.
OUTPUT_SHARDS = (128, 128, 128)
MIN_SELECTION_VOXELS = 4  # auto selection scale: the coarsest where the crop spans at least this per axis
MAX_SELECTION_VOXELS = 2**26  # the coarse volume read whole for tissue selection (64 Mi voxels)
CACHE_BYTES = 64 * 2**20  # tensorstore cache: shard indices and chunks shared by neighbouring blocks
ABOUT = About(
    title="Janelia FlyEM hemibrain v1.0/v1.2 grayscale (CLAHE, JPEG)",
    page="https://www.janelia.org/project-team/flyem/hemibrain",
    # Janelia releases the hemibrain under CC BY 4.0 (FlyEM release page; not restated in the bucket itself).
    licence="CC BY 4.0",
    citation="L. K. Scheffer et al. A connectome and analysis of the adult Drosophila central brain. eLife 9, "
             "e57443, 2020.",
    doi=("10.7554/eLife.57443",),
)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class HemibrainParams:
    """params.yaml section ``hemibrain``; every vector is z, y, x (precomputed itself is x, y, z)."""

    seed: int
    crop_size: Sequence[int] = (1000, 1000, 1000)  # voxels at ``scale``
    level: int = 0  # index into the EM info's scales (0 = 8 nm)
    min_tissue_fraction: float = 0.9
    with_segmentation: bool = True
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
        if not isinstance(self.with_segmentation, bool):
            raise InvalidParameterError(
                f"hemibrain.with_segmentation must be true or false, got {self.with_segmentation!r}")
        b = self.background_max_value
        if not _is_int(b) or not 0 <= b < 255:
            raise InvalidParameterError(f"hemibrain.background_max_value must be an integer in [0, 254], got {b!r}")
        for name, lo, hi in (("origin_step", 1, 2**20), ("max_attempts", 1, 10**7), ("concurrency", 1, 1024)):
            v = getattr(self, name)
            if not _is_int(v) or not lo <= v <= hi:
                raise InvalidParameterError(f"hemibrain.{name} must be an integer in [{lo}, {hi}], got {v!r}")
        m = self.max_inflight_mb
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0:
            raise InvalidParameterError(f"hemibrain.max_inflight_mb must be a positive number, got {m!r}")


@dataclass(frozen=True)
class CropPlan:
    """Everything decided before the first voxel of the crop is read (all vectors z, y, x)."""

    em: VolumeInfo
    em_info: dict[str, Any]
    em_scale: ScaleInfo
    selection_scale: ScaleInfo
    segmentation: VolumeInfo | None
    segmentation_info: dict[str, Any] | None
    segmentation_scale: ScaleInfo | None
    origin_lo: tuple[int, int, int]  # inclusive range of allowed origins (global voxels at em_scale)
    origin_hi: tuple[int, int, int]


@dataclass(frozen=True)
class Selection:
    origin: tuple[int, int, int]  # global voxel index (z, y, x) at the crop's scale
    tissue_fraction: float
    attempts: int


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
        seg = parse_info(seg_doc, SEGMENTATION_URL)
        if seg.data_type != "uint64" or seg.num_channels != 1:
            raise SourceMismatchError(
                f"{SEGMENTATION_URL}/info: expected 1-channel uint64, got {seg.num_channels} x {seg.data_type}")
        seg_scale = seg.scale_with_resolution(scale.resolution_nm)
        if seg_scale is None:
            raise SourceMismatchError(
                f"{SEGMENTATION_URL}/info has no scale at {list(scale.resolution_nm)} nm (z, y, x) to match EM "
                f"{scale.describe()}; set hemibrain.with_segmentation: false or another hemibrain.level")
        lo = tuple(max(a, b) for a, b in zip(lo, seg_scale.voxel_offset, strict=True))
        hi = tuple(min(a, e - c) for a, e, c in zip(hi, seg_scale.end, crop, strict=True))
        if any(a > b for a, b in zip(lo, hi, strict=True)):
            raise InvalidParameterError(
                f"hemibrain.crop_size {list(crop)} (z, y, x) does not fit where the EM {scale.describe()} and the "
                f"segmentation {seg_scale.describe()} overlap")
    selection = _selection_scale(params, em, scale)
    step_lo, step_hi = _step_range(lo, hi, scale.voxel_offset, params.origin_step)  # type: ignore[arg-type]
    if any(a > b for a, b in zip(step_lo, step_hi, strict=True)):
        raise InvalidParameterError(
            f"hemibrain.origin_step {params.origin_step}: no origin on that grid fits crop_size {list(crop)}")
    return CropPlan(em=em, em_info=dict(em_doc), em_scale=scale, selection_scale=selection, segmentation=seg,
                    segmentation_info=dict(seg_doc) if seg_doc is not None else None,
                    segmentation_scale=seg_scale, origin_lo=lo, origin_hi=hi)  # type: ignore[arg-type]


def _selection_scale(params: HemibrainParams, em: VolumeInfo, scale: ScaleInfo) -> ScaleInfo:
    if params.selection_level == "auto":
        candidates = [s for s in em.scales
                      if all(c * r / rc >= MIN_SELECTION_VOXELS for c, r, rc in
                             zip(params.crop_size, scale.resolution_nm, s.resolution_nm, strict=True))
                      and math.prod(s.size) <= MAX_SELECTION_VOXELS]
        if not candidates:
            raise InvalidParameterError(
                f"hemibrain.selection_level 'auto': no EM scale is both coarse enough to read whole "
                f"(<= {MAX_SELECTION_VOXELS} voxels) and fine enough for crop_size {list(params.crop_size)} to "
                f"span {MIN_SELECTION_VOXELS} voxels per axis; set hemibrain.selection_level")
        return max(candidates, key=lambda s: math.prod(s.resolution_nm))
    index = int(params.selection_level)
    if index >= len(em.scales):
        raise InvalidParameterError(
            f"hemibrain.selection_level {index} does not exist: the EM volume has scales 0..{len(em.scales) - 1}")
    chosen = em.scales[index]
    if math.prod(chosen.size) > MAX_SELECTION_VOXELS:
        raise InvalidParameterError(
            f"hemibrain.selection_level {index} is too large to read whole ({math.prod(chosen.size)} voxels > "
            f"{MAX_SELECTION_VOXELS}); choose a coarser scale or 'auto'")
    return chosen


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
    tissue = coarse_em > background_max_value
    integral = np.zeros(tuple(n + 1 for n in tissue.shape), dtype=np.int32)
    integral[1:, 1:, 1:] = tissue.cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32).cumsum(2, dtype=np.int32)
    return integral


def choose_origin(params: HemibrainParams, plan: CropPlan, integral: np.ndarray) -> Selection:
    """Draw origins from the seed until one lands in tissue; the same seed and info give the same origin."""
    rng = np.random.default_rng(params.seed)
    offset = plan.em_scale.voxel_offset
    m_lo, m_hi = _step_range(plan.origin_lo, plan.origin_hi, offset, params.origin_step)
    best = 0.0
    for attempt in range(1, params.max_attempts + 1):
        m = rng.integers(m_lo, np.asarray(m_hi) + 1)
        origin = tuple(int(o + k * params.origin_step) for o, k in zip(offset, m, strict=True))
        fraction = tissue_window_fraction(integral, plan.selection_scale, plan.em_scale, origin, params.crop_size)
        best = max(best, fraction)
        if fraction >= params.min_tissue_fraction:
            return Selection(origin, fraction, attempt)  # type: ignore[arg-type]
    raise InvalidParameterError(
        f"hemibrain.min_tissue_fraction {params.min_tissue_fraction}: no crop of {list(params.crop_size)} reached it "
        f"in {params.max_attempts} attempts from seed {params.seed} (best {best:.3f}); lower it, shrink crop_size "
        f"or raise max_attempts")


def provenance(params: HemibrainParams, plan: CropPlan, sel: Selection, origin: str) -> Provenance:
    """The output's ``emdata`` attributes: live URLs only (never the mirror), nothing time-dependent."""
    scale = plan.em_scale
    origin_nm = [o * r for o, r in zip(sel.origin, scale.resolution_nm, strict=True)]
    labels = None
    if plan.segmentation is not None and plan.segmentation_scale is not None:
        labels = {"segmentation": {
            "layer": SEGMENTATION_LAYER, "source_url": SEGMENTATION_URL, "level": plan.segmentation_scale.index,
            "scale_key": plan.segmentation_scale.key, "info": plan.segmentation_info,
            "values": "neuron body ids of the v1.0 segmentation (uint64); 0 = no body",
        }}
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
        "selection": {
            "method": "coarse EM tissue fraction, origins drawn with numpy.random.default_rng(seed)",
            "level": plan.selection_scale.index,
            "scale_key": plan.selection_scale.key,
            "background_max_value": params.background_max_value,
            "min_tissue_fraction": params.min_tissue_fraction,
            "tissue_fraction": round(sel.tissue_fraction, 6),
            "attempts": sel.attempts,
            "origin_step": params.origin_step,
        },
        "info": plan.em_info,
    }
    return Provenance(dataset="hemibrain", about=ABOUT, origin=origin, voxel_size_nm=scale.resolution_nm,
                      labels=labels, details=details)


class HemibrainSource:
    name = "hemibrain"

    def parse_params(self, section: Mapping[str, Any] | None) -> HemibrainParams:
        return dataclass_from_section(HemibrainParams, section, "hemibrain")

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


def fetch_hemibrain_crop(params: HemibrainParams, ctx: RunContext, out: Path) -> dict[str, Any]:
    """Choose the crop from the seed and write it (and its segmentation) to ``out`` atomically."""
    began = time.monotonic()
    fetch = ctx.downloader(progress=False)
    em_doc = fetch.fetch_json(f"{EM_URL}/info")
    seg_doc = fetch.fetch_json(f"{SEGMENTATION_URL}/info") if params.with_segmentation else None
    plan = plan_crop(params, em_doc, seg_doc)  # every check against the info: before any voxel is read
    scale = plan.em_scale
    log.info("hemibrain: crop %s (z, y, x) of EM %s; tissue check at %s", list(params.crop_size),
             scale.describe(), plan.selection_scale.describe())

    context = ctx.tensorstore_context(concurrency=params.concurrency, cache_bytes=CACHE_BYTES)
    t0 = time.monotonic()
    coarse = ts_result(open_scale(ctx, EM_URL, plan.selection_scale.index, context, "hemibrain EM").read(),
                       f"hemibrain EM selection level {plan.selection_scale.index}")
    integral = tissue_integral(coarse, params.background_max_value)
    del coarse
    sel = choose_origin(params, plan, integral)
    selection_s = time.monotonic() - t0
    origin_nm = [o * r for o, r in zip(sel.origin, scale.resolution_nm, strict=True)]
    log.info("hemibrain: origin %s voxels = %s nm (z, y, x), tissue %.3f after %d draw(s)", list(sel.origin),
             origin_nm, sel.tissue_fraction, sel.attempts)

    geometry = ngff.Geometry(scale.resolution_nm, tuple(origin_nm))  # type: ignore[arg-type]
    budget = params.max_inflight_mb * 2**20

    def blocks(live_url: str, level: int, dtype: Any, what: str) -> ngff.Blocks:
        view = open_scale(ctx, live_url, level, context, what)
        return remote_blocks(view, params.crop_size, sel.origin, dtype=dtype, max_inflight_bytes=budget, what=what)

    labels = []
    if plan.segmentation_scale is not None:
        labels.append(ngff.Label("segmentation", blocks(SEGMENTATION_URL, plan.segmentation_scale.index,
                                                         np.uint64, "hemibrain segmentation"), method="mode"))
    with atomic_dir(out) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        written = ngff.write_image(
            root, name="hemibrain_crop", source=blocks(EM_URL, scale.index, np.uint8, "hemibrain EM"),
            geometry=geometry, chunks=OUTPUT_CHUNKS, shards=OUTPUT_SHARDS,
            method="mean", labels=labels, what="hemibrain EM")
        root.attrs["emdata"] = provenance(params, plan, sel, ctx.origin).to_dict()
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
        "with_segmentation": plan.segmentation_scale is not None,
        "write": written,
        "em_MBps_end_to_end": round(em_bytes / 1e6 / max(seconds, 1e-9), 1),
        "seconds": round(seconds, 2),
    }


SOURCE = HemibrainSource()
