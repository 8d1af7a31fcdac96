"""The optional PyTorch adapter (skipped when torch is not installed) and its lazy import."""

from __future__ import annotations

import subprocess
import sys

import pytest
from access_fixtures import em_like, make_volume


def test_package_import_does_not_import_torch():
    code = "import sys, emdata.access; assert 'torch' not in sys.modules and 'emdata.access.torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_torch_datasets(tmp_path):
    torch = pytest.importorskip("torch")
    from emdata.access import BlockGrid, BlockSpec, RandomBlockSampler, open_array
    from emdata.access.torch import grid_dataset, sampler_dataset

    path = make_volume(tmp_path / "t.zarr", em_like((16, 16, 16)), n_levels=1)
    ds = grid_dataset(BlockGrid(open_array(path), BlockSpec(8, halo_voxels=2)))
    assert len(ds) == 8 and ds[0]["data"].shape == (1, 12, 12, 12)
    loader = torch.utils.data.DataLoader(
        sampler_dataset(RandomBlockSampler({"raw": open_array(path)}, 8, seed=0, num_samples=4)), batch_size=2)
    batches = list(loader)
    assert len(batches) == 2 and batches[0]["raw"]["data"].shape == (2, 1, 8, 8, 8)
