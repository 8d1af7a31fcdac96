"""The hemibrain replica: real paths and extents, FlyEM's sharding, the verbatim segmentation info, tissue in a
mostly empty box with a JPEG-noisy halo, missing shards answering 404 (or 403 when switched), the same bytes."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from urllib.error import HTTPError

import numpy as np
import pytest
import tensorstore as ts

from emdata.formats.precomputed import ShardingInfo, compressed_morton_code, encode_shard, parse_info
from emdata.offline.replica.hemibrain import (BUCKET_DIR, EM_PATH, EM_SIZE_XYZ, PROFILES, SEG_PATH, build, em_info,
                                              segmentation_info_bytes)

REFERENCE = Path(__file__).parent / "fixtures" / "reference" / "sources"
LIVE = "https://storage.googleapis.com/neuroglancer-janelia-flyem-hemibrain"
# The sharding block of FlyEM's own JPEG precomputed info (janelia-flyem/dvid ngprecomputed_test.go sampleInfo),
# the same at every scale.
FLYEM_JPEG_SHARDING = {"@type": "neuroglancer_uint64_sharded_v1", "data_encoding": "gzip", "hash": "identity",
                       "minishard_bits": 6, "minishard_index_encoding": "gzip", "preshift_bits": 9, "shard_bits": 15}


def open_scale(tree: Path, path: str, scale: int) -> ts.TensorStore:
    """A scale of the replica read from its files by tensorstore (an independent reader of the shards), z, y, x."""
    store = ts.open({"driver": "neuroglancer_precomputed", "scale_index": scale,
                     "kvstore": {"driver": "file", "path": str(tree / BUCKET_DIR / path)}}).result()
    return store[ts.d["channel"][0]].T


def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method)) as r:
            return r.status, dict(r.headers), r.read()
    except HTTPError as e:
        return e.code, dict(e.headers), b""


def test_segmentation_info_is_served_byte_identical_to_the_verbatim_one(replica):
    verbatim = (REFERENCE / "hemibrain_v1.0_segmentation_info.json").read_bytes()
    assert segmentation_info_bytes() == verbatim
    status, headers, body = get(f"{replica.base_url}/{BUCKET_DIR}/{SEG_PATH}/info")
    assert status == 200 and body == verbatim
    assert "md5=" in headers["x-goog-hash"]  # GCS's object hash, as the real bucket sends


def test_em_info_has_the_real_extents_and_flyem_sharding_at_every_scale(replica_tree):
    doc = json.loads((replica_tree / BUCKET_DIR / EM_PATH / "info").read_text())
    assert doc == em_info()
    assert (doc["data_type"], doc["type"], doc["num_channels"]) == ("uint8", "image", 1)
    assert len(doc["scales"]) == 9
    assert doc["scales"][0]["size"] == list(EM_SIZE_XYZ) == [34427, 39725, 41394]
    assert all("voxel_offset" not in s for s in doc["scales"])  # absent = 0, as in the real documents
    for i, s in enumerate(doc["scales"]):
        assert s["sharding"] == FLYEM_JPEG_SHARDING
        assert (s["encoding"], s["jpeg_quality"], s["chunk_sizes"]) == ("jpeg", 75, [[64, 64, 64]])
        assert s["resolution"] == [8.0 * 2**i] * 3
        assert s["size"] == [-(-n // 2**i) for n in EM_SIZE_XYZ]
    volume = parse_info(doc, f"{LIVE}/{EM_PATH}")  # within every bound the source checks
    assert volume.scales[0].grid == (647, 621, 538)


def test_only_the_shards_around_the_tissue_exist(replica, replica_tree):
    em = replica_tree / BUCKET_DIR / EM_PATH
    shards = sorted(p.relative_to(em).as_posix() for p in em.rglob("*.shard"))
    # The tissue straddles shard boundaries (2048 voxels at scale 0) on every axis: 8 shards at scale 0.
    assert len([s for s in shards if s.startswith("8.0x8.0x8.0/")]) == 8
    assert sum(p.stat().st_size for p in em.rglob("*.shard")) < 64 * 2**20
    info = parse_info(json.loads((em / "info").read_text()), f"{LIVE}/{EM_PATH}")
    lo, hi = PROFILES["small"].tissue_zyx()
    assert set(info.scales[0].chunk_files(lo, hi)) <= set(shards)
    far = info.scales[0].chunk_files((0, 0, 0), (1, 1, 1))[0]
    assert far not in shards
    url = f"{replica.base_url}/{BUCKET_DIR}/{EM_PATH}/{far}"
    assert get(url, "HEAD")[0] == 404  # the real bucket allows anonymous listing: a missing object is 404
    replica.set_behaviour({"missing_status": {"storage.googleapis.com": 403}})
    assert get(url, "HEAD")[0] == 403  # a bucket without anonymous listing


def test_tissue_in_a_mostly_empty_box_with_a_noisy_halo(replica_tree):
    coarse = open_scale(replica_tree, EM_PATH, 7).read().result()  # 1024 nm, the whole box
    assert coarse.shape == (324, 311, 269)
    assert (coarse == 0).mean() > 0.999  # absent shards and chunks read as fill
    lo, hi = PROFILES["small"].tissue_zyx()
    em = open_scale(replica_tree, EM_PATH, 0)
    seg = open_scale(replica_tree, SEG_PATH, 0)
    # A slab across the tissue's low-x face: 128 voxels of outside, then tissue.
    box = (slice(lo[0] + 96, lo[0] + 160), slice(lo[1] + 96, lo[1] + 160), slice(lo[2] - 128, lo[2] + 64))
    e, s = em[box].read().result(), seg[box].read().result()
    tissue = e[:, :, 128 + 16:]  # past the faces' wobble (at most 12 voxels)
    assert (tissue > 10).mean() > 0.99 and (s[:, :, 128 + 16:] > 0).all()
    halo = e[:, :, 128 - 48:128 - 16]  # 16..48 voxels outside: the JPEG-noisy background
    assert 1 <= np.median(halo) <= 8 and (halo > 0).mean() > 0.8 and np.percentile(halo, 99) <= 15
    assert (s[:, :, :128 - 16] == 0).all()  # no bodies outside the tissue
    assert (e[:, :, :32] == 0).all()  # beyond the halo (64 voxels): nothing stored
    assert len(np.unique(s)) > 20  # many bodies, not one
    labelled = s > 0
    assert ((e > 10) == labelled)[:, :, 128 + 16:].mean() > 0.99


def test_segmentation_volume_is_read_through_the_verbatim_info(replica_tree):
    seg = open_scale(replica_tree, SEG_PATH, 0)
    assert seg.shape == (41408, 39552, 34432) and seg.dtype == ts.uint64
    coarse = open_scale(replica_tree, SEG_PATH, 8).read().result()  # preshift 6 at this scale, as in the real info
    assert coarse.shape == (162, 155, 135) and (coarse > 0).sum() > 0


def test_shard_encoder_is_what_tensorstore_reads(tmp_path):
    # A small volume whose chunks spread over several shards and minishards, written by encode_shard.
    sharding = ShardingInfo(preshift_bits=1, minishard_bits=2, shard_bits=2, hash="identity",
                            minishard_index_encoding="gzip", data_encoding="gzip")
    info = {"@type": "neuroglancer_multiscale_volume", "data_type": "uint8", "num_channels": 1, "type": "image",
            "scales": [{"chunk_sizes": [[4, 4, 4]], "encoding": "raw", "key": "s0", "resolution": [1, 1, 1],
                        "size": [16, 12, 8], "sharding": {
                            "@type": "neuroglancer_uint64_sharded_v1", "preshift_bits": 1, "minishard_bits": 2,
                            "shard_bits": 2, "hash": "identity", "minishard_index_encoding": "gzip",
                            "data_encoding": "gzip"}}]}
    (tmp_path / "s0").mkdir()
    (tmp_path / "info").write_text(json.dumps(info))
    data = np.random.default_rng(3).integers(1, 255, (8, 12, 16), dtype=np.uint8)  # z, y, x
    shards: dict[int, list[tuple[int, bytes]]] = {}
    for gz, gy, gx in np.ndindex(2, 3, 4):
        if (gz + gy + gx) % 3 == 0:
            continue  # absent chunks read as fill
        chunk_id = compressed_morton_code((gx, gy, gz), (4, 3, 2))
        raw = data[gz * 4:(gz + 1) * 4, gy * 4:(gy + 1) * 4, gx * 4:(gx + 1) * 4].tobytes()  # raw: x fastest
        shards.setdefault(sharding.shard_of(chunk_id)[0], []).append((chunk_id, raw))
    for shard, chunks in shards.items():
        (tmp_path / "s0" / sharding.shard_name(shard)).write_bytes(encode_shard(chunks, sharding))
    assert len(shards) > 1
    got = ts.open({"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(tmp_path)}}
                  ).result()[ts.d["channel"][0]].T.read().result()
    expected = data.copy()
    for gz, gy, gx in np.ndindex(2, 3, 4):
        if (gz + gy + gx) % 3 == 0:
            expected[gz * 4:(gz + 1) * 4, gy * 4:(gy + 1) * 4, gx * 4:(gx + 1) * 4] = 0
    np.testing.assert_array_equal(got, expected)


@pytest.mark.slow
def test_build_is_deterministic(replica_tree, tmp_path):
    # A fresh build of the hemibrain replica holds the same bytes as the session's.
    build(tmp_path, "small")
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert len(fresh) > 30
    assert all((tmp_path / rel).read_bytes() == (replica_tree / rel).read_bytes() for rel in fresh)


def test_chunk_files_name_what_tensorstore_writes(tmp_path):
    # Unsharded: the chunk files themselves (what a 403 would name); the volume has an offset and a ragged edge.
    info = {"@type": "neuroglancer_multiscale_volume", "data_type": "uint8", "num_channels": 1, "type": "image",
            "scales": [{"chunk_sizes": [[8, 8, 8]], "encoding": "raw", "key": "s0", "resolution": [4, 4, 4],
                        "size": [20, 12, 9], "voxel_offset": [3, 5, 7]}]}
    (tmp_path / "info").write_text(json.dumps(info))
    store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(tmp_path)},
                     "open": True}).result()
    store.write(np.ones(store.shape, np.uint8)).result()
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()
                     and p.name != "info")
    scale = parse_info(json.loads((tmp_path / "info").read_text()), "test").scales[0]
    assert scale.chunk_files(scale.voxel_offset, scale.end) == written
    assert len(written) == 3 * 2 * 2
    one = scale.chunk_files((7, 5, 3), (8, 6, 4))  # the first voxel (z, y, x)
    assert one == [f"{scale.key}/3-11_5-13_7-15"]
