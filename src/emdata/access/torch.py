"""Optional PyTorch adapters for grids and samplers; torch is imported only when an adapter is built."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from emdata.access.grid import Block, BlockGrid
from emdata.access.sampling import RandomBlockSampler

# torch has no uint16/uint32/uint64 tensors in older releases: widen to a signed type that holds them.
_TORCH_SAFE = {np.dtype(np.uint16): np.int32, np.dtype(np.uint32): np.int64, np.dtype(np.uint64): np.int64}


def block_to_item(block: Block) -> dict[str, Any]:
    """A block as a dict of a (1, z, y, x) tensor and its placement (plain Python values, collate-friendly)."""
    import torch

    data = block.data
    assert data is not None
    if data.dtype in _TORCH_SAFE:
        data = data.astype(_TORCH_SAFE[data.dtype])
    return {
        "data": torch.from_numpy(np.ascontiguousarray(data))[None],
        "read_start": torch.tensor(block.read_box.start),
        "core_start": torch.tensor(block.core_box.start),
        "core_stop": torch.tensor(block.core_box.stop),
        "index": torch.tensor(block.index),
        "voxel_size_nm": torch.tensor(block.voxel_size_nm),
        "read_origin_nm": torch.tensor(block.read_origin_nm),
    }


def grid_dataset(grid: BlockGrid) -> Any:
    """A map-style ``torch.utils.data.Dataset`` over ``grid`` for inference (pair with ``BlockWriter``).

    With DDP, give the DataLoader a ``DistributedSampler``, or build one grid per rank from ``grid.shard``.
    """
    from torch.utils.data import Dataset

    class GridDataset(Dataset):  # type: ignore[type-arg]
        def __init__(self) -> None:
            self.grid = grid

        def __len__(self) -> int:
            return len(self.grid)

        def __getitem__(self, index: int) -> dict[str, Any]:
            return block_to_item(self.grid[index])

    return GridDataset()


def sampler_dataset(sampler: RandomBlockSampler) -> Any:
    """An ``IterableDataset`` of training samples; DataLoader workers and DDP ranks draw disjoint indices.

    Worker ``w`` of ``W`` on rank ``r`` of ``R`` draws sample indices ``(r * W + w) + k * R * W``; set
    ``prefetch=0`` on the sampler when the DataLoader's workers already read ahead.
    """
    from torch.utils.data import IterableDataset, get_worker_info

    class SamplerDataset(IterableDataset):  # type: ignore[type-arg]
        def __iter__(self):  # type: ignore[no-untyped-def]
            info = get_worker_info()
            mine = sampler
            if info is not None and info.num_workers > 1:
                mine = copy.copy(sampler)
                mine.rank = sampler.rank * info.num_workers + info.id
                mine.world_size = sampler.world_size * info.num_workers
            for sample in mine:
                yield {key: block_to_item(block) for key, block in sample.items()}

    return SamplerDataset()
