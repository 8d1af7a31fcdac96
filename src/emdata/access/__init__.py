"""Block-wise access to OME-Zarr volumes for ML: open, grid iteration, random sampling, write-back (z, y, x)."""

from emdata.access.cache import ChunkCache, default_cache
from emdata.access.grid import Block, BlockGrid, axis_blocks
from emdata.access.open import EmArray, open_array, resolve_dataset
from emdata.access.sampling import RandomBlockSampler, SamplerState, SamplingError
from emdata.access.spec import BlockSpec, Box, RoiNm

__all__ = [
    "Block", "BlockGrid", "BlockSpec", "Box", "ChunkCache", "EmArray", "RandomBlockSampler", "RoiNm",
    "SamplerState", "SamplingError", "axis_blocks", "default_cache", "open_array", "resolve_dataset",
]
