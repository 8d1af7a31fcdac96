"""PyTorch datasets: DataLoader workers under fork/spawn/forkserver, DDP ranks, exact resume, sampler with a BlockSpec."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from access_fixtures import em_like, make_volume

torch = pytest.importorskip("torch")

from emdata.access import BlockGrid, BlockSpec, RandomBlockSampler, open_array  # noqa: E402
from emdata.access.torch import data_loader, grid_dataset, safe_start_method, sampler_dataset  # noqa: E402
from emdata.errors import InvalidParameterError  # noqa: E402

METHODS = ["fork", "spawn", "forkserver"]


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    path = tmp_path_factory.mktemp("torch") / "vol.zarr"
    image = em_like((16, 24, 24), seed=3)
    mito = (image > 150).astype(np.uint8)
    make_volume(path, image, n_levels=1, labels={"mito": mito})
    return path, image, mito


def _parent_arrays(path):
    """Arrays opened in the parent with the default (tensorstore) backend, and used: its threads are running."""
    raw, mito = open_array(path), open_array(path, label="mito")
    assert raw.backend == "tensorstore"
    raw.read(raw.bounds), mito.read(mito.bounds)
    return raw, mito


def _grid_items(loader):
    return [(int(i), d) for batch in loader for i, d in zip(batch["flat_index"], batch["data"], strict=True)]


def _sample_ids(loader):
    return [int(i) for batch in loader for i in batch["sample_index"]]


def test_package_import_does_not_import_torch():
    code = "import sys, emdata.access; assert 'torch' not in sys.modules and 'emdata.access.torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow  # worker processes start and import torch: ~5 s idle, ~30 s on a loaded 2-core box
@pytest.mark.parametrize("method", METHODS)
def test_two_workers_yield_every_block_and_sample_once(volume, method):
    if method not in multiprocessing.get_all_start_methods():
        pytest.fail(f"start method {method} is missing on this platform")
    path, image, _ = volume
    raw, mito = _parent_arrays(path)
    grid = BlockGrid(raw, BlockSpec(8, halo_voxels=2, border="reflect"), prefetch=0)
    loader = data_loader(grid_dataset(grid), batch_size=3, num_workers=2, multiprocessing_context=method)
    items = _grid_items(loader)
    assert sorted(i for i, _ in items) == list(range(len(grid)))
    padded = np.pad(image, 2, mode="reflect")
    for flat, data in items:
        block = grid.block_at(flat)
        start = [a + 2 for a in block.read_box.start]
        np.testing.assert_array_equal(data[0].numpy(), padded[tuple(slice(a, a + 12) for a in start)])
    sampler = RandomBlockSampler({"raw": raw, "mito": mito}, 8, seed=5, num_samples=10, prefetch=0)
    ids = _sample_ids(data_loader(sampler_dataset(sampler), batch_size=4, num_workers=2,
                                  multiprocessing_context=method))
    assert sorted(ids) == list(range(10))
    # The parent's arrays still read through tensorstore afterwards.
    assert raw.backend == "tensorstore" and raw.read(raw.bounds).sum() == image.sum()


@pytest.mark.parametrize("workers", [0, 1])
def test_zero_and_one_worker_yield_every_block_once(volume, workers):
    path, _, _ = volume
    raw, mito = _parent_arrays(path)
    grid = BlockGrid(raw, BlockSpec((8, 12, 12), overlap_voxels=(2, 4, 4)), prefetch=0)
    items = _grid_items(data_loader(grid_dataset(grid), batch_size=2, num_workers=workers))
    assert sorted(i for i, _ in items) == list(range(len(grid)))
    sampler = RandomBlockSampler({"raw": raw, "mito": mito}, 8, seed=5, num_samples=7)
    assert sorted(_sample_ids(data_loader(sampler_dataset(sampler), batch_size=3, num_workers=workers))) == list(range(7))
    # A sampler given its own rank keeps it: rank 1 of 2 draws the odd indices.
    ranked = RandomBlockSampler({"raw": raw}, 8, seed=5, num_samples=3, rank=1, world_size=2)
    assert sorted(_sample_ids(data_loader(sampler_dataset(ranked), num_workers=workers))) == [1, 3, 5]


def test_forked_child_of_a_tensorstore_process_reads_through_zarr(volume):
    path, image, _ = volume
    _parent_arrays(path)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        backend, total, error = pool.apply(_open_in_child, (str(path),))
    assert backend == "zarr" and total == int(image.sum())
    assert "forked from a process whose tensorstore threads were running" in error


def _open_in_child(path):
    arr = open_array(path)
    try:
        open_array(path, backend="tensorstore")
        error = ""
    except InvalidParameterError as exc:
        error = str(exc)
    return arr.backend, int(arr.read(arr.bounds).sum()), error


@pytest.mark.slow  # worker processes start and import torch: ~5 s idle, ~30 s on a loaded 2-core box
def test_two_ddp_ranks_times_two_workers_cover_everything_once(volume):
    path, _, _ = volume
    raw, mito = _parent_arrays(path)
    grid = BlockGrid(raw, BlockSpec(8, halo_voxels=1), prefetch=0)
    seen: Counter[int] = Counter()
    samples: Counter[int] = Counter()
    for rank in range(2):
        ds = grid_dataset(grid, rank=rank, world_size=2)
        assert len(ds) in (len(grid) // 2, len(grid) // 2 + 1)
        seen.update(i for i, _ in _grid_items(data_loader(ds, batch_size=2, num_workers=2)))
        sampler = RandomBlockSampler({"raw": raw, "mito": mito}, 8, seed=1, num_samples=5, prefetch=0)
        samples.update(_sample_ids(data_loader(sampler_dataset(sampler, rank=rank, world_size=2),
                                               batch_size=2, num_workers=2)))
    assert sorted(seen) == list(range(len(grid))) and set(seen.values()) == {1}
    assert sorted(samples) == list(range(10)) and set(samples.values()) == {1}


@pytest.mark.slow  # worker processes start and import torch: ~5 s idle, ~30 s on a loaded 2-core box
@pytest.mark.parametrize("n_head", [1, 3])
def test_resume_from_loader_checkpoint_with_workers(volume, n_head):
    path, _, _ = volume
    raw, mito = _parent_arrays(path)

    def loader():
        sampler = RandomBlockSampler({"raw": raw, "mito": mito}, 8, seed=9, num_samples=11, prefetch=0)
        return data_loader(sampler_dataset(sampler), batch_size=2, num_workers=2)

    full = list(loader())
    order = [int(i) for b in full for i in b["sample_index"]]
    assert sorted(order) == list(range(11))
    first = loader()
    it = iter(first)
    head = [next(it) for _ in range(n_head)]  # 1: the second worker has delivered nothing yet
    state = first.state_dict()
    del it
    resumed = loader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    got = [int(i) for b in head + rest for i in b["sample_index"]]
    assert got == order
    # Same data, not just the same indices.
    for a, b in zip(full, head + rest, strict=True):
        assert torch.equal(a["raw"]["data"], b["raw"]["data"]) and torch.equal(a["mito"]["data"], b["mito"]["data"])


def test_resume_grid_and_epochs_in_process(volume):
    path, _, _ = volume
    raw, _ = _parent_arrays(path)
    grid = BlockGrid(raw, BlockSpec(8), prefetch=0)
    first = data_loader(grid_dataset(grid), batch_size=2)
    it = iter(first)
    head = [int(i) for _ in range(2) for i in next(it)["flat_index"]]
    resumed = data_loader(grid_dataset(grid), batch_size=2)
    resumed.load_state_dict(first.state_dict())
    rest = [int(i) for b in resumed for i in b["flat_index"]]
    assert head + rest == list(range(len(grid)))
    sampler = RandomBlockSampler({"raw": raw}, 8, seed=2, num_samples=4, prefetch=0)
    ds = sampler_dataset(sampler)
    epoch0 = _sample_ids(data_loader(ds, batch_size=2))
    ds.set_epoch(1)
    epoch1 = _sample_ids(data_loader(ds, batch_size=2))
    assert epoch0 == [0, 1, 2, 3] and epoch1 == [4, 5, 6, 7]


def test_sampler_takes_the_grid_blockspec(volume):
    path, image, mito_data = volume
    raw, mito = open_array(path), open_array(path, label="mito")
    spec = BlockSpec((6, 8, 8), halo_voxels=(2, 3, 3), border="reflect")
    sampler = RandomBlockSampler({"raw": raw, "mito": mito}, spec, seed=4, num_samples=6, prefetch=0)
    padded = np.pad(image, [(2, 2), (3, 3), (3, 3)], mode="reflect")
    for sample in sampler:
        block = sample["raw"]
        assert block.data.shape == spec.read_shape_voxels and block.block_box.shape == (6, 8, 8)
        assert block.read_box == block.block_box.grow((2, 3, 3))
        start = [a + h for a, h in zip(block.read_box.start, (2, 3, 3), strict=True)]
        np.testing.assert_array_equal(block.data, padded[tuple(slice(a, a + s) for a, s in
                                                             zip(start, spec.read_shape_voxels, strict=True))])
        np.testing.assert_array_equal(sample["mito"].data[sample["mito"].block_in_read],
                                      mito_data[sample["mito"].block_box.slices])
    drop = RandomBlockSampler({"raw": raw}, BlockSpec(8, halo_voxels=4, border="drop"), seed=0, num_samples=20)
    for sample in drop:
        assert raw.bounds.contains(sample["raw"].read_box)
    with pytest.raises(InvalidParameterError, match="shrink"):
        RandomBlockSampler({"raw": raw}, BlockSpec(8, border="shrink"), seed=0)
    with pytest.raises(InvalidParameterError, match="conflicts"):
        RandomBlockSampler({"raw": raw}, spec, seed=0, border="edge")
    # The same spec drives a grid: identical block and read shapes for training and inference.
    block = BlockGrid(raw, spec)[0]
    assert block.data.shape == spec.read_shape_voxels


def test_safe_start_method_and_explicit_context():
    assert safe_start_method() in ("forkserver", "spawn")
    assert safe_start_method() in multiprocessing.get_all_start_methods()


def _item_as_before(block):
    """block_to_item as it was written before it was made cheaper: one torch.tensor per field."""
    data = block.data.astype(np.int32) if block.data.dtype == np.uint16 else block.data
    return {"data": torch.from_numpy(np.ascontiguousarray(data))[None],
            "read_start": torch.tensor(block.read_box.start), "block_start": torch.tensor(block.block_box.start),
            "core_start": torch.tensor(block.core_box.start), "core_stop": torch.tensor(block.core_box.stop),
            "index": torch.tensor(block.index), "voxel_size_nm": torch.tensor(block.voxel_size_nm),
            "read_origin_nm": torch.tensor(block.read_origin_nm)}


def _assert_same(got, expected):
    if isinstance(expected, dict):
        assert type(got) is dict and got.keys() == expected.keys()
        for key in expected:
            _assert_same(got[key], expected[key])
    else:
        assert got.dtype == expected.dtype and got.shape == expected.shape and torch.equal(got, expected)
        assert got.is_contiguous()


def test_items_and_batches_equal_default_collate_of_plain_tensors(volume):
    from torch.utils.data import default_collate

    from emdata.access.torch import block_to_item, collate

    path, _, _ = volume
    grid = BlockGrid(open_array(path), BlockSpec((8, 12, 12), halo_voxels=3, border="reflect"))
    sampler = RandomBlockSampler({"raw": open_array(path), "mito": open_array(path, label="mito")}, (4, 12, 12),
                                 seed=5, num_samples=6)
    blocks = list(grid)
    for block in blocks + [s["raw"] for s in sampler]:
        _assert_same(block_to_item(block), _item_as_before(block))
    batch = [block_to_item(b) for b in blocks[:5]]
    _assert_same(collate(batch), default_collate([_item_as_before(b) for b in blocks[:5]]))
    # The loader's batches are those of default_collate over the same items.
    loader = data_loader(sampler_dataset(sampler), batch_size=3)
    plain = data_loader(sampler_dataset(sampler), batch_size=3, collate_fn=default_collate)
    for got, expected in zip(loader, plain, strict=True):
        _assert_same(got, expected)
    big = [{"data": torch.randint(0, 255, (1, 40, 40, 40), dtype=torch.uint8), "i": torch.tensor(k)} for k in range(4)]
    _assert_same(collate(big), default_collate(big))  # large tensors are stacked by numpy: the same result


def test_main_process_batches_equal_default_collate(volume):
    """With 0 workers the batches are exactly default_collate's, also the last, shorter one, and items a user's
    wrapper changed on the way (replaced, or edited in place) are batched as changed."""
    from torch.utils.data import IterableDataset, default_collate

    from emdata.access.torch import collate

    path, _, _ = volume

    def sampler(n=7):
        return RandomBlockSampler({"raw": open_array(path), "mito": open_array(path, label="mito")},
                                  {"raw": BlockSpec((4, 12, 12), halo_voxels=2, border="reflect"), "mito": (4, 12, 12)},
                                  seed=9, num_samples=n)

    loader = data_loader(sampler_dataset(sampler()), batch_size=3)
    plain = list(data_loader(sampler_dataset(sampler()), batch_size=3, collate_fn=default_collate))
    got = list(loader)
    assert [len(b["sample_index"]) for b in got] == [3, 3, 1]
    for g, e in zip(got, plain, strict=True):
        _assert_same(g, e)
    assert got[0]["raw"]["data"].shape == (3, 1, 8, 16, 16)

    class Brighter(IterableDataset):
        """A user's wrapper that replaces each item's data (a new tensor) and edits another in place."""

        def __init__(self, inner):
            self.inner = inner

        def __iter__(self):
            for item in self.inner:
                item["raw"]["data"] = item["raw"]["data"] + 1
                item["mito"]["data"][0, 0, 0, 0] = 7
                yield item

    wrapped = data_loader(Brighter(sampler_dataset(sampler())), batch_size=3, collate_fn=collate)
    expected = data_loader(Brighter(sampler_dataset(sampler())), batch_size=3, collate_fn=default_collate)
    for g, e in zip(wrapped, expected, strict=True):
        _assert_same(g, e)
        assert (g["mito"]["data"][:, 0, 0, 0, 0] == 7).all()


def test_sampler_batched_in_the_dataset(volume, tmp_path):
    """data_loader batches a SamplerDataset in the dataset (blocks_to_batch): the same batches as collating its
    items, also for uint16 data, another default float dtype, drop_last; checkpoints and set_epoch still reach the
    user's dataset; a bad batch_size is refused up front."""
    from torch.utils.data import default_collate

    from emdata.access.torch import block_to_item, blocks_to_batch

    path, image, _ = volume
    wide = make_volume(tmp_path / "wide.zarr", image.astype(np.uint16) * 250, n_levels=1)

    def sampler(n=7, seed=9):
        return RandomBlockSampler({"raw": open_array(path), "wide": open_array(wide)},
                                  {"raw": BlockSpec((4, 12, 12), halo_voxels=2, border="reflect"), "wide": (4, 8, 8)},
                                  seed=seed, num_samples=n)

    samples = list(sampler())
    for key in ("raw", "wide"):
        blocks = [s[key] for s in samples[:5]]
        _assert_same(blocks_to_batch(blocks), default_collate([_item_as_before(b) for b in blocks]))
    assert blocks_to_batch([s["wide"] for s in samples[:2]])["data"].dtype == torch.int32
    default = torch.get_default_dtype()
    try:
        for dtype in (torch.float64, torch.bfloat16):
            torch.set_default_dtype(dtype)
            blocks = [s["raw"] for s in samples[:3]]
            got = blocks_to_batch(blocks)
            _assert_same(got, default_collate([block_to_item(b) for b in blocks]))
            assert got["voxel_size_nm"].dtype == dtype
    finally:
        torch.set_default_dtype(default)

    loader = data_loader(sampler_dataset(sampler()), batch_size=3, drop_last=True)
    plain = list(data_loader(sampler_dataset(sampler()), batch_size=3, drop_last=True, collate_fn=default_collate))
    got = list(loader)
    assert [len(b["sample_index"]) for b in got] == [3, 3]
    for g, e in zip(got, plain, strict=True):
        _assert_same(g, e)

    # Samples are read straight into the batch (sample(out=)); rejected tries (foreground) are read over.
    fg = RandomBlockSampler({"raw": open_array(path), "mito": open_array(path, label="mito")}, (4, 12, 12), seed=1,
                            num_samples=5, foreground_key="mito", min_foreground_fraction=0.3)
    out = {k: np.empty(shape, dtype) for k, (shape, dtype) in fg.read_shapes().items()}
    got_sample = fg.sample(2, out=out)
    assert got_sample["raw"].data is out["raw"] and got_sample["mito"].data is out["mito"]
    np.testing.assert_array_equal(out["raw"], fg.sample(2)["raw"].data)
    for g, e in zip(data_loader(sampler_dataset(fg), batch_size=2),
                    data_loader(sampler_dataset(fg), batch_size=2, collate_fn=default_collate), strict=True):
        _assert_same(g, e)
    with pytest.raises(InvalidParameterError, match="need"):
        blocks_to_batch([s["raw"] for s in samples[:2]], np.empty((3, 1, 8, 16, 16), np.uint8))

    # A checkpoint taken mid-epoch resumes after the batches already delivered; set_epoch on the user's dataset.
    ds = sampler_dataset(sampler(n=8))
    first = data_loader(ds, batch_size=3)
    it = iter(first)
    head = [int(i) for i in next(it)["sample_index"]]
    state = first.state_dict()
    resumed = data_loader(sampler_dataset(sampler(n=8)), batch_size=3)
    resumed.load_state_dict(state)
    assert head + _sample_ids(resumed) == list(range(8))
    ds.set_epoch(1)
    assert _sample_ids(data_loader(ds, batch_size=3)) == list(range(8, 16))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InvalidParameterError, match="batch_size"):
            data_loader(sampler_dataset(sampler()), batch_size=bad)


def test_uint64_values_that_int64_cannot_hold_are_refused(tmp_path):
    """uint64 labels become int64 tensors; a value >= 2^63 is refused (naming it), never wrapped to a negative."""
    from emdata.access.torch import block_to_item, blocks_to_batch

    ids = np.full((8, 8, 8), 2**40 + 7, np.uint64)
    path = make_volume(tmp_path / "ids.zarr", ids, n_levels=1, chunks=(8, 8, 8), shards=None)
    block = BlockGrid(open_array(path), BlockSpec(8))[0]
    assert int(block_to_item(block)["data"].max()) == 2**40 + 7
    assert int(blocks_to_batch([block])["data"].min()) == 2**40 + 7
    big = block.with_data(np.full((8, 8, 8), 2**63 + 5, np.uint64))
    for convert in (block_to_item, lambda b: blocks_to_batch([b])):
        with pytest.raises(InvalidParameterError, match="9223372036854775813"):
            convert(big)
