"""Seeded, restartable random sampling of aligned blocks from one or more arrays (image, labels, levels)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from emdata.access.grid import Block, prefetched
from emdata.access.open import EmArray
from emdata.access.spec import PAD_MODES, BlockSpec, Box, RoiNm, Triple, as_triple
from emdata.errors import EmDataError, InvalidParameterError

Sample = dict[str, Block]
_EPS = 1e-9
MAX_MASK_VOXELS = 2**26


class SamplingError(EmDataError, RuntimeError):
    """No acceptable sample was found within ``max_tries`` candidates."""


@dataclass(frozen=True)
class SamplerState:
    """Everything needed to resume a sampler: samples are a pure function of (seed, index)."""

    seed: int
    position: int
    rank: int = 0
    world_size: int = 1

    def to_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "position": self.position, "rank": self.rank, "world_size": self.world_size}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> SamplerState:
        return cls(int(state["seed"]), int(state["position"]), int(state.get("rank", 0)),
                   int(state.get("world_size", 1)))


class RandomBlockSampler:
    """Random blocks of several arrays at the same physical place, e.g. ``{"raw": image, "mito": labels}``.

    Sample ``i`` depends only on ``(seed, i)``, so a run restarts exactly from ``state_dict()`` and DDP ranks
    draw disjoint indices (``rank + k * world_size``). Block origins are drawn on the voxel grid of the
    coarsest array (the anchor) and mapped to every other array through physical coordinates, so arrays whose
    voxel sizes are integer multiples line up exactly. The anchor's block stays inside ``roi_nm`` (default:
    the anchor array); other arrays are padded with ``border`` where they end.

    ``block_shape_voxels`` is a shape, a ``BlockSpec`` (the one the inference grid uses), or one of either
    per array. A spec's ``halo_voxels`` are read around each block as context (``Block.read_box`` =
    ``block_box`` grown by the halo, ``data`` covers the read box, ``block_in_read`` selects the block), and
    its ``border`` (``constant``/``reflect``/``edge`` pad like ``numpy.pad``; ``drop`` keeps the anchor's
    block and halo inside the anchor array) applies to its array, and its ROI to the sampling region;
    ``shrink`` makes variable shapes and is refused.

    ``mask`` (an array, best a coarse level of a label) weights origins: each mask voxel is picked with
    weight 1 if foreground, ``mask_background_weight`` otherwise. ``min_foreground_fraction`` rejects samples
    whose ``foreground_key`` block holds too little foreground (``foreground_values``, default: nonzero).
    """

    def __init__(
        self,
        arrays: Mapping[str, EmArray],
        block_shape_voxels: int | Sequence[int] | BlockSpec | Mapping[str, int | Sequence[int] | BlockSpec],
        *,
        seed: int,
        roi_nm: RoiNm | None = None,
        border: str = "constant",
        constant_value: float = 0,
        mask: EmArray | None = None,
        mask_background_weight: float = 0.0,
        foreground_key: str | None = None,
        foreground_values: Sequence[int] | None = None,
        min_foreground_fraction: float = 0.0,
        max_tries: int = 100,
        num_samples: int | None = None,
        prefetch: int = 4,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not arrays:
            raise InvalidParameterError("arrays must name at least one array")
        specs = _specs_by_key(block_shape_voxels, arrays)
        self.pads, roi_nm = _spec_settings(specs, arrays, border, constant_value, roi_nm)
        if not 0.0 <= min_foreground_fraction <= 1.0:
            raise InvalidParameterError(f"min_foreground_fraction must be in [0, 1], got {min_foreground_fraction!r}")
        if min_foreground_fraction > 0 and foreground_key not in arrays:
            raise InvalidParameterError(
                f"foreground_key must name one of {sorted(arrays)} when min_foreground_fraction > 0, "
                f"got {foreground_key!r}")
        if not 0 <= rank < world_size:
            raise InvalidParameterError(f"rank must be in 0..{world_size - 1}, got rank={rank!r}")
        if max_tries < 1:
            raise InvalidParameterError(f"max_tries must be >= 1, got {max_tries!r}")
        self.arrays = dict(arrays)
        if isinstance(block_shape_voxels, Mapping):
            missing = set(self.arrays) - set(block_shape_voxels)
            if missing:
                raise InvalidParameterError(f"block_shape_voxels has no shape for {sorted(missing)}")
            self.block_shapes: dict[str, Triple] = {
                k: specs[k].block_shape_voxels if k in specs else
                as_triple(block_shape_voxels[k], f"block_shape_voxels[{k!r}]", minimum=1)  # type: ignore[arg-type]
                for k in self.arrays}
        elif isinstance(block_shape_voxels, BlockSpec):
            self.block_shapes = {k: block_shape_voxels.block_shape_voxels for k in self.arrays}
        else:
            shape = as_triple(block_shape_voxels, "block_shape_voxels", minimum=1)
            self.block_shapes = {k: shape for k in self.arrays}
        self.halos: dict[str, Triple] = {k: specs[k].halo_voxels if k in specs else (0, 0, 0) for k in self.arrays}
        self.seed = int(seed)
        self.border = border
        self.constant_value = constant_value
        self.foreground_key = foreground_key
        self.foreground_values = None if foreground_values is None else np.asarray(foreground_values)
        self.min_foreground_fraction = float(min_foreground_fraction)
        self.max_tries = int(max_tries)
        self.num_samples = num_samples
        self.prefetch = prefetch
        self.rank, self.world_size = int(rank), int(world_size)
        self.position = 0
        # The coarsest array is the anchor: drawing on its grid keeps the finer arrays aligned exactly.
        self.anchor = max(self.arrays, key=lambda k: math.prod(self.arrays[k].voxel_size_nm))
        anchor = self.arrays[self.anchor]
        roi = anchor.bounds if roi_nm is None else anchor.roi_to_voxels(roi_nm)
        if roi.size == 0 or not anchor.bounds.contains(roi):
            raise InvalidParameterError(
                f"roi_nm {roi_nm} is outside the array {self.anchor!r}: voxels {roi.start}..{roi.stop} vs shape "
                f"{anchor.shape} (z, y, x)")
        if specs and self.anchor in specs and specs[self.anchor].roi_voxels is not None and roi_nm is None:
            roi_voxels = specs[self.anchor].roi_voxels
            assert roi_voxels is not None
            roi = roi_voxels
            if not anchor.bounds.contains(roi):
                raise InvalidParameterError(
                    f"roi_voxels {roi} of the spec is outside the array {self.anchor!r} of shape {anchor.shape}")
        if self.pads[self.anchor][0] == "drop":
            # Keep the anchor's block *and halo* inside the array: nothing outside it is ever read.
            lo = [max(a, h) for a, h in zip(roi.start, self.halos[self.anchor], strict=True)]
            hi = [max(min(b, n - h), a) for a, b, n, h in zip(lo, roi.stop, anchor.shape, self.halos[self.anchor],
                                                              strict=True)]
            roi = Box((lo[0], lo[1], lo[2]), (hi[0], hi[1], hi[2]))
        shape = self.block_shapes[self.anchor]
        if any(b > s for b, s in zip(shape, roi.shape, strict=True)):
            raise InvalidParameterError(
                f"block_shape_voxels {shape} of {self.anchor!r} is larger than the sampling region "
                f"{roi.shape} (z, y, x)")
        self.origin_low = np.array(roi.start)
        self.origin_high = np.array(roi.stop) - np.array(shape)  # inclusive
        self._mask_cdf: np.ndarray | None = None
        if mask is not None:
            self._init_mask(mask, mask_background_weight)

    def _init_mask(self, mask: EmArray, background_weight: float) -> None:
        if math.prod(mask.shape) > MAX_MASK_VOXELS:
            raise InvalidParameterError(
                f"mask level {mask.level} has {math.prod(mask.shape)} voxels (> {MAX_MASK_VOXELS}); "
                f"pass a coarser level (open_array(..., level=n))")
        if background_weight < 0:
            raise InvalidParameterError(f"mask_background_weight must be >= 0, got {background_weight!r}")
        data = mask.read(mask.bounds)
        fg = self._is_foreground(data)
        weights = np.where(fg, 1.0, float(background_weight)).ravel()
        cdf = np.cumsum(weights)
        if cdf[-1] <= 0:
            raise InvalidParameterError("mask has no foreground and mask_background_weight is 0: nothing to sample")
        self._mask = mask
        self._mask_cdf = cdf

    def _is_foreground(self, data: np.ndarray) -> np.ndarray:
        if self.foreground_values is None:
            return data != 0
        return np.isin(data, self.foreground_values)

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError("this sampler is endless; pass num_samples to give it a length")
        return self.num_samples

    def state_dict(self) -> dict[str, int]:
        return SamplerState(self.seed, self.position, self.rank, self.world_size).to_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        st = SamplerState.from_dict(state)
        if st.seed != self.seed:
            raise InvalidParameterError(f"state has seed {st.seed}, this sampler {self.seed}")
        self.position, self.rank, self.world_size = st.position, st.rank, st.world_size

    def __iter__(self) -> Iterator[Sample]:
        """Samples from ``position`` on (``num_samples`` per rank, or endless), read ``prefetch`` ahead."""
        start = self.position

        def indices() -> Iterator[int]:
            k = start
            while self.num_samples is None or k < self.num_samples:
                yield self.rank + k * self.world_size
                k += 1

        for n, sample in enumerate(prefetched(indices(), self.sample, self.prefetch)):
            # Counted before handing out, so a state saved while holding this sample resumes after it.
            self.position = start + n + 1
            yield sample

    def __getitem__(self, index: int) -> Sample:
        return self.sample(index)

    def sample(self, index: int, out: Mapping[str, np.ndarray] | None = None) -> Sample:
        """Sample number ``index`` (global, over all ranks): the same for the same seed, every time.

        ``out``: per key (any subset), an array of ``read_shapes()[key]`` and the array's dtype that the
        block's data is read into (the block's ``data`` is then that array).
        """
        outs = {} if out is None else out
        rng = np.random.default_rng([self.seed, int(index)])
        for _ in range(self.max_tries):
            origin = self._draw_origin(rng)
            boxes = self.boxes_at(origin)
            if self.min_foreground_fraction > 0:
                key = self.foreground_key
                assert key is not None
                labels = self._read(key, boxes[key], index, outs.get(key))
                assert labels.data is not None
                fraction = float(self._is_foreground(labels.data[labels.block_in_read]).mean())
                if fraction < self.min_foreground_fraction:
                    continue
                return {k: labels if k == key else self._read(k, b, index, outs.get(k)) for k, b in boxes.items()}
            return {k: self._read(k, b, index, outs.get(k)) for k, b in boxes.items()}
        raise SamplingError(
            f"no sample with foreground fraction >= {self.min_foreground_fraction} in {self.foreground_key!r} "
            f"after {self.max_tries} tries (sample {index}); lower the threshold or weight origins with mask=")

    def _draw_origin(self, rng: np.random.Generator) -> np.ndarray:
        if self._mask_cdf is None:
            return rng.integers(self.origin_low, self.origin_high, endpoint=True)
        flat = int(np.searchsorted(self._mask_cdf, rng.uniform(0, self._mask_cdf[-1]), side="right"))
        flat = min(flat, self._mask_cdf.size - 1)
        voxel = np.array(np.unravel_index(flat, self._mask.shape), dtype=float)
        # A uniform point inside the picked mask voxel, then the anchor block centred on it.
        point_nm = (np.array(self._mask.translation_nm) + (voxel + rng.uniform(-0.5, 0.5, 3))
                    * np.array(self._mask.voxel_size_nm))
        anchor = self.arrays[self.anchor]
        origin = self._start_for(anchor, self.block_shapes[self.anchor], point_nm)
        return np.clip(origin, self.origin_low, self.origin_high)

    @staticmethod
    def _start_for(array: EmArray, shape: Sequence[int], centre_nm: np.ndarray) -> np.ndarray:
        pos = (centre_nm - np.array(array.translation_nm)) / np.array(array.voxel_size_nm)
        return np.floor(pos - np.array(shape) / 2 + 0.5 + _EPS).astype(np.int64)

    def centre_nm(self, anchor_origin: Sequence[int] | np.ndarray) -> np.ndarray:
        """Physical centre (nm, z, y, x) of the anchor block starting at ``anchor_origin``."""
        anchor = self.arrays[self.anchor]
        shape = np.array(self.block_shapes[self.anchor])
        return np.array(anchor.translation_nm) + (np.array(anchor_origin) + shape / 2 - 0.5) * np.array(
            anchor.voxel_size_nm)

    def boxes_at(self, anchor_origin: Sequence[int] | np.ndarray) -> dict[str, Box]:
        """Each array's voxel box for the anchor block starting at ``anchor_origin``."""
        centre = self.centre_nm(anchor_origin)
        out = {}
        for key, array in self.arrays.items():
            shape = self.block_shapes[key]
            start = self._start_for(array, shape, centre)
            out[key] = Box.from_shape(shape, tuple(int(s) for s in start))
        return out

    def read_shapes(self) -> dict[str, tuple[tuple[int, int, int], np.dtype]]:
        """Each key's (shape, dtype) of a sample's data: the block grown by its halo, the same for every sample."""
        return {k: (tuple(b + 2 * h for b, h in zip(self.block_shapes[k], self.halos[k], strict=True)),  # type: ignore[misc]
                    np.dtype(self.arrays[k].dtype)) for k in self.arrays}

    def _read(self, key: str, box: Box, index: int, out: np.ndarray | None = None) -> Block:
        array = self.arrays[key]
        read_box = box.grow(self.halos[key])
        mode, constant = self.pads[key]
        data = array.read_padded(read_box, "constant" if mode == "drop" else mode, constant, out=out)
        return Block(index=(index,), read_box=read_box, block_box=box, core_box=box, level=array.level,
                     voxel_size_nm=array.voxel_size_nm, translation_nm=array.translation_nm, data=data)


def _specs_by_key(block_shape_voxels: Any, arrays: Mapping[str, EmArray]) -> dict[str, BlockSpec]:
    if isinstance(block_shape_voxels, BlockSpec):
        return {k: block_shape_voxels for k in arrays}
    if isinstance(block_shape_voxels, Mapping):
        return {k: v for k, v in block_shape_voxels.items() if isinstance(v, BlockSpec)}
    return {}


def _spec_settings(specs: Mapping[str, BlockSpec], arrays: Mapping[str, EmArray], border: str,
                   constant_value: float, roi_nm: RoiNm | None
                   ) -> tuple[dict[str, tuple[str, float]], RoiNm | None]:
    """Each array's (border, constant) and the ROI from the block specs, checked for sampling.

    Arrays without a spec use ``border``/``constant_value``. A spec's ``overlap_voxels`` is a grid setting
    and is ignored: random samples have no neighbours.
    """
    if border not in PAD_MODES:
        raise InvalidParameterError(f"border must be one of {PAD_MODES} for sampling, got {border!r}")
    pads: dict[str, tuple[str, float]] = {}
    for key in arrays:
        spec = specs.get(key)
        if spec is None:
            pads[key] = (border, constant_value)
            continue
        if border != "constant" and border != spec.border:
            raise InvalidParameterError(f"border={border!r} conflicts with the block spec's border {spec.border!r}")
        if spec.border not in (*PAD_MODES, "drop"):
            raise InvalidParameterError(
                f"border {spec.border!r} of {key!r} makes blocks of different shapes, which cannot be batched; use "
                f"one of {(*PAD_MODES, 'drop')} for sampling")
        if spec.level is not None and spec.level != arrays[key].level:
            raise InvalidParameterError(
                f"the spec for {key!r} asks for level {spec.level} but the array is opened at level "
                f"{arrays[key].level}; open it with open_array(..., level={spec.level})")
        pads[key] = (spec.border, spec.constant_value)
    rois = {s.roi_nm for s in specs.values() if s.roi_nm is not None}
    if len(rois) > 1:
        raise InvalidParameterError(f"the block specs disagree on roi_nm: {rois}")
    if roi_nm is None and rois:
        roi_nm = rois.pop()
    return pads, roi_nm
