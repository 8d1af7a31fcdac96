"""Random sampling: seeded and restartable, rank-disjoint, aligned across arrays and levels, foreground-weighted."""

from __future__ import annotations

import json

import numpy as np
import pytest
from access_fixtures import em_like, make_volume

from emdata.access import RandomBlockSampler, RoiNm, SamplingError, open_array
from emdata.ngff import _downsample


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    image = em_like((32, 48, 40), seed=3)
    mito = np.zeros(image.shape, np.uint8)
    mito[20:28, 30:44, 4:12] = 1  # a small "mitochondrion": about 1% of the volume
    path = make_volume(root / "toy.zarr", image, voxel_size_nm=(8, 4, 4), translation_nm=(10, 20, 30),
                       labels={"mito": mito}, n_levels=2)
    return path, image, mito


def origins(samples, key="raw"):
    return [s[key].read_box.start for s in samples]


def test_seeded_reproducible_and_restartable(volume):
    path, image, _ = volume
    arrays = {"raw": open_array(path)}
    a = RandomBlockSampler(arrays, 8, seed=7, num_samples=20)
    first = list(a)
    again = list(RandomBlockSampler(arrays, 8, seed=7, num_samples=20))
    other = list(RandomBlockSampler(arrays, 8, seed=8, num_samples=20))
    assert origins(first) == origins(again) and origins(first) != origins(other)
    for s in first:
        np.testing.assert_array_equal(s["raw"].data, image[s["raw"].read_box.slices])
    # Save the state mid-way (through JSON, as a checkpoint would), resume in a new sampler.
    b = RandomBlockSampler(arrays, 8, seed=7, num_samples=20)
    it = iter(b)
    head = [next(it) for _ in range(6)]
    state = json.loads(json.dumps(b.state_dict()))
    assert state["position"] == 6
    resumed = RandomBlockSampler(arrays, 8, seed=7, num_samples=20)
    resumed.load_state_dict(state)
    assert origins(head) + origins(list(resumed)) == origins(first)
    with pytest.raises(ValueError, match="seed"):
        RandomBlockSampler(arrays, 8, seed=1).load_state_dict(state)


def test_ranks_draw_disjoint_indices(volume):
    path, _, _ = volume
    arrays = {"raw": open_array(path)}
    ranks = [RandomBlockSampler(arrays, 8, seed=1, num_samples=5, rank=r, world_size=3) for r in range(3)]
    indices = sorted(s["raw"].index[0] for r in ranks for s in r)
    assert indices == list(range(15))
    single = RandomBlockSampler(arrays, 8, seed=1)
    assert origins([ranks[1].sample(4)]) == origins([single[4]])


def test_image_and_labels_are_aligned(volume):
    path, _, mito = volume
    sampler = RandomBlockSampler({"raw": open_array(path), "mito": open_array(path, label="mito")},
                                 {"raw": (12, 12, 12), "mito": (4, 4, 4)}, seed=0, num_samples=10)
    for s in sampler:
        raw, lab = s["raw"], s["mito"]
        # Same centre in nm: the 4^3 label block sits in the middle of the 12^3 raw block.
        assert tuple(a + 4 for a in raw.read_box.start) == lab.read_box.start
        assert raw.read_box.contains(lab.read_box)
        np.testing.assert_array_equal(lab.data, mito[lab.read_box.slices])


def test_two_levels_sampled_at_the_same_physical_place(volume):
    path, _, _ = volume
    fine, coarse = open_array(path, level=0), open_array(path, level=1)
    sampler = RandomBlockSampler({"fine": fine, "coarse": coarse}, {"fine": 8, "coarse": 4}, seed=5, num_samples=12)
    assert sampler.anchor == "coarse"
    for s in sampler:
        f, c = s["fine"], s["coarse"]
        assert fine.box_nm(f.read_box) == coarse.box_nm(c.read_box)  # identical physical extent
        np.testing.assert_array_equal(_downsample(f.data, "mean"), c.data)  # the pyramid's own 2x mean


def test_min_foreground_fraction_and_mask_weighting(volume):
    path, _, _ = volume
    arrays = {"raw": open_array(path), "mito": open_array(path, label="mito")}
    rejecting = RandomBlockSampler(arrays, 8, seed=2, foreground_key="mito", min_foreground_fraction=0.25,
                                   max_tries=2000, num_samples=8)
    for s in rejecting:
        assert s["mito"].data.mean() >= 0.25
    weighted = RandomBlockSampler(arrays, 8, seed=2, mask=open_array(path, label="mito", level=1), num_samples=40)
    hits = np.mean([s["mito"].data.any() for s in weighted])
    uniform = RandomBlockSampler(arrays, 8, seed=2, num_samples=40)
    assert hits == 1.0 and np.mean([s["mito"].data.any() for s in uniform]) < 0.5
    with pytest.raises(SamplingError, match="after 3 tries"):
        RandomBlockSampler(arrays, 8, seed=2, foreground_key="mito", min_foreground_fraction=0.99,
                           max_tries=3).sample(0)
    # Read into given arrays (as the torch adapter does): the same samples, rejected tries overwritten.
    shapes = rejecting.read_shapes()
    assert shapes == {"raw": ((8, 8, 8), np.dtype(np.uint8)), "mito": ((8, 8, 8), np.dtype(np.uint8))}
    for i in range(4):
        out = {k: np.full(shape, 99, dtype) for k, (shape, dtype) in shapes.items()}
        got, expected = rejecting.sample(i, out=out), rejecting.sample(i)
        for k in arrays:
            assert got[k].data is out[k] and got[k].read_box == expected[k].read_box
            np.testing.assert_array_equal(got[k].data, expected[k].data)


def test_roi_and_errors(volume):
    path, _, _ = volume
    raw = open_array(path)
    roi = RoiNm((10, 20, 30), (10 + 16 * 8, 20 + 16 * 4, 30 + 16 * 4))  # voxels 0..16 on each axis
    for s in RandomBlockSampler({"raw": raw}, 8, seed=0, roi_nm=roi, num_samples=30):
        assert all(0 <= a and b <= 16 for a, b in zip(s["raw"].read_box.start, s["raw"].read_box.stop))
    with pytest.raises(ValueError, match="larger than the sampling region"):
        RandomBlockSampler({"raw": raw}, (64, 8, 8), seed=0)
    with pytest.raises(ValueError, match="outside the array"):
        RandomBlockSampler({"raw": raw}, 8, seed=0, roi_nm=RoiNm((-900, 0, 0), (-100, 8, 8)))
    with pytest.raises(ValueError, match="foreground_key"):
        RandomBlockSampler({"raw": raw}, 8, seed=0, min_foreground_fraction=0.1)
    with pytest.raises(ValueError, match="3 values"):
        RandomBlockSampler({"raw": raw}, (8, 8), seed=0)
