"""OME-Zarr 0.5 writing: geometry of every level, sharding, labels, and what ome-zarr's reader sees."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Multiscales, Reader

from emdata import ngff
from emdata.errors import InvalidParameterError


def test_level_geometry_mean_shifts_half_a_voxel_nearest_does_not():
    g = ngff.Geometry((8.0, 4.0, 4.0), (100.0, 0.0, -4.0))
    mean2 = g.level(2, "mean")
    assert mean2.voxel_size_nm == (32.0, 16.0, 16.0)
    assert mean2.translation_nm == (100.0 + 12.0, 6.0, -4.0 + 6.0)  # (4 - 1) / 2 voxels of level 0
    assert g.level(2, "nearest").translation_nm == g.translation_nm


def test_level_shapes_keep_border_voxels():
    assert ngff.level_shapes((165, 768, 1024), 3) == [(165, 768, 1024), (83, 384, 512), (42, 192, 256)]
    assert ngff.default_n_levels((165, 768, 1024)) == 5


@pytest.mark.parametrize("bad", [(5, 5), (5, 0, 5), (5, -1, 5)])
def test_bad_voxel_size_names_the_value(bad):
    with pytest.raises(InvalidParameterError, match="voxel_size_nm"):
        ngff.Geometry(bad)


def test_written_image_and_labels_read_back_through_ome_zarr(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, (70, 130, 90), dtype=np.uint8)
    mask = (data > 200).astype(np.uint8)
    g = ngff.Geometry((5.0, 5.0, 5.0), (0.0, 10.0, 20.0))
    root, arrays = ngff.create_image_group(tmp_path / "x.zarr", name="x", shape=data.shape, dtype=data.dtype,
                                           geometry=g, n_levels=3, chunks=(32, 32, 32), shards=(64, 64, 64))
    ngff.write_block_aligned(arrays[0], data)
    ngff.write_pyramid(arrays, "mean")
    labels = ngff.create_label(root, "mask", shape=mask.shape, dtype=np.uint8, geometry=g, n_levels=3,
                               chunks=(32, 32, 32), shards=(64, 64, 64))
    ngff.write_block_aligned(labels[0], mask)
    ngff.write_pyramid(labels, "nearest")

    assert arrays[0].shards == (64, 64, 64) and arrays[0].chunks == (32, 32, 32)
    np.testing.assert_array_equal(arrays[0][...], data)
    # Level 1 is the rounded 2x2x2 mean; labels are strided, never averaged.
    expected = np.rint(data.astype(np.float32).reshape(35, 2, 65, 2, 45, 2).mean(axis=(1, 3, 5)))
    np.testing.assert_array_equal(arrays[1][...], expected.astype(np.uint8))
    np.testing.assert_array_equal(labels[1][...], mask[::2, ::2, ::2])
    assert set(np.unique(labels[2][...])) <= {0, 1}

    nodes = list(Reader(parse_url(str(tmp_path / "x.zarr")))())
    image = next(n for n in nodes if any(isinstance(s, Multiscales) for s in n.specs)
                 and not any(isinstance(s, Label) for s in n.specs))
    assert [d.shape for d in image.data] == [(70, 130, 90), (35, 65, 45), (18, 33, 23)]
    label = next(n for n in nodes if any(isinstance(s, Label) for s in n.specs))
    assert label.data[0].shape == (70, 130, 90)
    attrs = zarr.open_group(str(tmp_path / "x.zarr"), mode="r").attrs["ome"]
    assert attrs["version"] == "0.5"
    t1 = attrs["multiscales"][0]["datasets"][1]["coordinateTransformations"]
    assert t1 == [{"type": "scale", "scale": [10.0, 10.0, 10.0]},
                  {"type": "translation", "translation": [2.5, 12.5, 22.5]}]
