"""The hemibrain replica: real paths, an info shaped like the real one, tissue in empty background, same bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts

from emdata.offline.replica.hemibrain import BUCKET_DIR, EM_PATH, PROFILES, SEG_PATH, build, em_info, segmentation_info

REFERENCE = Path(__file__).parent / "fixtures" / "reference" / "sources"


def open_scale(tree: Path, path: str, scale: int) -> ts.TensorStore:
    return ts.open({"driver": "neuroglancer_precomputed", "scale_index": scale,
                    "kvstore": {"driver": "file", "path": str(tree / BUCKET_DIR / path)}}).result()


def test_volumes_are_at_the_real_paths(replica_tree):
    bucket = replica_tree / "storage.googleapis.com" / "neuroglancer-janelia-flyem-hemibrain"
    assert (bucket / "emdata" / "clahe_yz" / "jpeg" / "info").is_file()
    assert (bucket / "v1.0" / "segmentation" / "info").is_file()
    assert list((bucket / "emdata" / "clahe_yz" / "jpeg" / "8.0x8.0x8.0").glob("*.shard"))


def test_info_is_shaped_like_the_real_ones(replica_tree):
    em = json.loads((replica_tree / BUCKET_DIR / EM_PATH / "info").read_text())
    seg = json.loads((replica_tree / BUCKET_DIR / SEG_PATH / "info").read_text())
    assert (em["data_type"], em["type"], em["num_channels"]) == ("uint8", "image", 1)
    assert {s["encoding"] for s in em["scales"]} == {"jpeg"}
    assert em["scales"][0]["sharding"]["@type"] == "neuroglancer_uint64_sharded_v1"
    assert any("sharding" not in s for s in em["scales"])  # coarse scales unsharded: both layouts exist
    assert em["scales"][0]["voxel_offset"] != [0, 0, 0]
    assert [s["resolution"][0] for s in em["scales"]] == [8 * 2**i for i in range(len(em["scales"]))]
    real_path = REFERENCE / "hemibrain_v1.0_segmentation_info.json"
    real = json.loads(real_path.read_text())
    assert {k for k in real if k != "scales"} == {k for k in seg if k != "scales"}
    assert set(real["scales"][0]) <= set(seg["scales"][0])  # plus voxel_offset
    assert seg["scales"][0]["key"] == real["scales"][0]["key"]
    assert seg["scales"][0]["sharding"].keys() == real["scales"][0]["sharding"].keys()
    assert {s["encoding"] for s in seg["scales"]} == {"compressed_segmentation"}
    for a, b in zip(em["scales"], seg["scales"], strict=True):
        assert (a["size"], a["voxel_offset"], a["resolution"]) == (b["size"], b["voxel_offset"], b["resolution"])


def test_tissue_blob_in_empty_background_and_labels_match(replica_tree):
    coarse = open_scale(replica_tree, EM_PATH, 2)[..., 0].read().result()
    tissue = coarse > 10
    assert 0.2 < tissue.mean() < 0.8
    assert not tissue[0].any() and not tissue[-1].any()  # the x faces are background
    em = open_scale(replica_tree, EM_PATH, 0)
    seg = open_scale(replica_tree, SEG_PATH, 0)
    assert em.domain.inclusive_min[:3] == tuple(PROFILES["small"].voxel_offset_xyz)
    box = tuple(slice(lo + 96, lo + 224) for lo in em.domain.inclusive_min[:3])
    e, s = em[box][..., 0].read().result(), seg[box][..., 0].read().result()
    assert ((s > 0) == (e > 10)).mean() > 0.99
    assert len(np.unique(s)) > 20  # many bodies, not one


def test_build_is_deterministic(tmp_path):
    trees = []
    for name in ("a", "b"):
        build(tmp_path / name, "small")
        trees.append({str(p.relative_to(tmp_path / name)): p.read_bytes()
                      for p in sorted((tmp_path / name).rglob("*")) if p.is_file()})
    assert trees[0].keys() == trees[1].keys()
    assert all(trees[0][k] == trees[1][k] for k in trees[0])


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_info_documents_are_consistent(profile):
    prof = PROFILES[profile]
    for info in (em_info(prof), segmentation_info(prof)):
        assert len(info["scales"]) == prof.n_scales
        for i, s in enumerate(info["scales"]):
            assert s["voxel_offset"] == [o // 2**i for o in prof.voxel_offset_xyz]
            assert all(o % 2**(prof.n_scales - 1) == 0 for o in prof.voxel_offset_xyz)
