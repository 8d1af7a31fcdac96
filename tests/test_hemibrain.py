"""The hemibrain crop end to end against the replica: selection, content, geometry, determinism, early failures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import tensorstore as ts
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Multiscales, Reader

from emdata import ngff
from emdata.errors import DownloadError, InvalidParameterError, SourceMismatchError
from emdata.acquire.context import MirrorConfig, RunContext
from emdata.acquire.params import DownloadConfig
from emdata.formats.precomputed import parse_info
from emdata.offline.replica import ReplicaServer
from emdata.offline.replica.hemibrain import BUCKET_DIR, EM_PATH, SEG_PATH
from emdata.catalog import find
from emdata.sources.hemibrain import EM_URL, SEGMENTATION_URL, SOURCE

CROP = [96, 112, 128]  # z, y, x: not a cube, so an axis mix-up cannot pass
FAST_DOWNLOAD = DownloadConfig(retries=1, backoff_s=0.0)


def run_crop(server: ReplicaServer, repo: Path, download: DownloadConfig = FAST_DOWNLOAD,
             **params: Any) -> tuple[dict[str, Any], Path]:
    section = {"seed": 7, "crop_size": CROP, "min_tissue_fraction": 0.9, **params}
    ctx = RunContext(mirror=MirrorConfig(server.base_url), download=download, repo_root=repo)
    metrics = SOURCE.run(SOURCE.parse_params(section), ctx)
    return metrics, repo / find("hemibrain").output


def replica_view(tree: Path, path: str, scale: int) -> ts.TensorStore:
    """The replica's stored volume read straight from its files (decoded like any reader), as z, y, x."""
    store = ts.open({"driver": "neuroglancer_precomputed", "scale_index": scale,
                     "kvstore": {"driver": "file", "path": str(tree / BUCKET_DIR / path)}}).result()
    return store[ts.d["channel"][0]].T


def crop_of(view: ts.TensorStore, origin: list[int], shape: list[int]) -> np.ndarray:
    return view[tuple(slice(o, o + s) for o, s in zip(origin, shape, strict=True))].read().result()


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def voxel_requests(server: ReplicaServer) -> list[str]:
    return [r for r in server.faults.requests_seen if not r.split()[1].endswith("/info")]


# ------------------------------------------------------------------------------------------- the crop itself
def test_crop_is_ome_zarr_at_its_true_position(replica, tmp_path):
    metrics, out = run_crop(replica, tmp_path)
    origin = metrics["crop_origin_voxels"]
    ms, arrays = ngff.open_multiscale(out)
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert {a["unit"] for a in ms["axes"]} == {"nanometer"}
    assert arrays[0].shape == tuple(CROP) and arrays[0].dtype == np.uint8
    assert arrays[0].shards == (128, 128, 128) and arrays[0].chunks == (64, 64, 64)
    scale, translation = ms["datasets"][0]["coordinateTransformations"]
    assert scale["scale"] == [8.0, 8.0, 8.0]
    assert translation["translation"] == [o * 8.0 for o in origin] == metrics["crop_origin_nm"]
    root = zarr.open_group(str(out), mode="r")
    attrs = root.attrs["emdata"]
    assert attrs["seed"] == 7 and attrs["crop_origin_voxels"] == origin
    assert attrs["crop_origin_xyz_voxels"] == origin[::-1]
    assert attrs["source_url"] == EM_URL
    assert attrs["info"]["scales"][0]["encoding"] == "jpeg"  # the info as read, recorded
    assert attrs["labels"]["segmentation"]["info"]["data_type"] == "uint64"
    # The mirror (host and port) is never recorded: outputs are the same whichever port served them.
    for meta in out.rglob("zarr.json"):
        assert "127.0.0.1" not in meta.read_text()
    # ome-zarr reads it: an image with a multiscale pyramid and a label image beside it.
    nodes = list(Reader(parse_url(str(out)))())
    assert any(isinstance(spec, Multiscales) for spec in nodes[0].specs)
    assert nodes[0].data[0].shape == tuple(CROP)
    assert "segmentation" in zarr.open_group(str(out / "labels"), mode="r").attrs["ome"]["labels"]


def test_crop_equals_replica_voxels_and_segmentation_at_the_origin(replica, replica_tree, tmp_path):
    metrics, out = run_crop(replica, tmp_path)
    origin = metrics["crop_origin_voxels"]
    _, arrays = ngff.open_multiscale(out)
    expected_em = crop_of(replica_view(replica_tree, EM_PATH, 0), origin, CROP)
    np.testing.assert_array_equal(arrays[0][:], expected_em)
    _, labels = ngff.open_multiscale(out, label="segmentation")
    expected_seg = crop_of(replica_view(replica_tree, SEG_PATH, 0), origin, CROP)
    assert labels[0].dtype == np.uint64
    np.testing.assert_array_equal(labels[0][:], expected_seg)
    # Voxel-aligned: tissue has body ids, background has none (up to JPEG ringing at the tissue's edge).
    em, seg = arrays[0][:], labels[0][:]
    assert ((seg > 0) == (em > 10)).mean() > 0.99


def test_unaligned_origin_reads_chunks_that_straddle_blocks(replica, replica_tree, tmp_path):
    metrics, out = run_crop(replica, tmp_path, origin_step=1, seed=3)
    origin = metrics["crop_origin_voxels"]
    assert any(o % 64 for o in origin)  # not on the chunk grid
    _, arrays = ngff.open_multiscale(out)
    np.testing.assert_array_equal(arrays[0][:], crop_of(replica_view(replica_tree, EM_PATH, 0), origin, CROP))
    _, labels = ngff.open_multiscale(out, label="segmentation")
    np.testing.assert_array_equal(labels[0][:], crop_of(replica_view(replica_tree, SEG_PATH, 0), origin, CROP))


def test_coarser_level_of_the_sharded_volume(replica, replica_tree, tmp_path):
    # Every scale is sharded as FlyEM shards its JPEG volumes; a crop at 32 nm reads scale 2's shards.
    info = json.loads((replica_tree / BUCKET_DIR / EM_PATH / "info").read_text())
    assert all(s["sharding"]["data_encoding"] == "gzip" for s in info["scales"])
    crop = [48, 56, 64]
    metrics, out = run_crop(replica, tmp_path, level=2, crop_size=crop, origin_step=1)
    ms, arrays = ngff.open_multiscale(out)
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [32.0, 32.0, 32.0]
    origin = metrics["crop_origin_voxels"]
    assert all("/32.0x32.0x32.0/" in r or "/1024.0x1024.0x1024.0/" in r for r in voxel_requests(replica)
               if "/emdata/" in r)
    np.testing.assert_array_equal(arrays[0][:], crop_of(replica_view(replica_tree, EM_PATH, 2), origin, crop))
    _, labels = ngff.open_multiscale(out, label="segmentation")
    np.testing.assert_array_equal(labels[0][:], crop_of(replica_view(replica_tree, SEG_PATH, 2), origin, crop))


def test_crop_lands_in_tissue(replica, tmp_path):
    metrics, out = run_crop(replica, tmp_path, min_tissue_fraction=0.95, origin_step=8, seed=11)
    assert metrics["tissue_fraction"] >= 0.95
    _, arrays = ngff.open_multiscale(out)
    assert (arrays[0][:] > 10).mean() > 0.9  # at full resolution too, not only in the coarse check


@pytest.mark.parametrize("none", [None, False])
def test_without_segmentation_fetches_none(replica, tmp_path, none):
    metrics, out = run_crop(replica, tmp_path, segmentation=none)
    assert not (out / "labels").exists() and metrics["segmentation"] is None
    assert not [r for r in replica.faults.requests_seen if "segmentation" in r]


def test_segmentation_release_is_a_param_checked_before_any_voxel(replica, tmp_path):
    metrics, out = run_crop(replica, tmp_path, segmentation="v1.0")
    assert metrics["segmentation"] == "v1.0"
    seg = zarr.open_group(str(out), mode="r").attrs["emdata"]["labels"]["segmentation"]
    assert seg["release"] == "v1.0" and seg["source_url"] == SEGMENTATION_URL
    replica.reset_faults()
    # Another release: its info is fetched first; the replica has none (404), so the run stops there.
    with pytest.raises(DownloadError, match="v1.2/segmentation/info"):
        run_crop(replica, tmp_path / "other", segmentation="v1.2")
    assert voxel_requests(replica) == []
    assert not (tmp_path / "other" / "data").exists()


# --------------------------------------------------------------------------------------------- determinism
def test_same_seed_gives_byte_identical_output(replica, tmp_path):
    m1, out1 = run_crop(replica, tmp_path / "a", seed=5, origin_step=8)
    assert m1["segmentation"] == "v1.0"
    m2, out2 = run_crop(replica, tmp_path / "b", seed=5, origin_step=8)
    assert m1["crop_origin_voxels"] == m2["crop_origin_voxels"]
    files1, files2 = all_files(out1), all_files(out2)
    assert files1.keys() == files2.keys() and len(files1) > 10
    assert all(files1[k] == files2[k] for k in files1)


def test_different_seed_gives_different_origin(replica, tmp_path):
    origins = {seed: run_crop(replica, tmp_path / str(seed), seed=seed, origin_step=8,
                              segmentation=None)[0]["crop_origin_voxels"] for seed in (1, 2)}
    assert origins[1] != origins[2]


def test_rerun_replaces_output_whole(replica, tmp_path):
    _, out = run_crop(replica, tmp_path, seed=1, origin_step=8, segmentation=None)
    _, out = run_crop(replica, tmp_path, seed=2, origin_step=8, segmentation=None)
    assert zarr.open_group(str(out), mode="r").attrs["emdata"]["seed"] == 2
    assert [p.name for p in tmp_path.joinpath("data").iterdir()] == ["hemibrain_crop.zarr"]


# ---------------------------------------------------------------------------------- failures, and when
@pytest.mark.parametrize(("section", "named"), [
    ({"crop_size": [0, 64, 64]}, "[0, 64, 64]"),
    ({"crop_size": [64, -1, 64]}, "[64, -1, 64]"),
    ({"crop_size": [64, 64]}, "[64, 64]"),
    ({"crop_size": [64, 64, 64.5]}, "64.5"),
    ({"seed": True}, "True"),
    ({"seed": -3}, "-3"),
    ({"level": -1}, "-1"),
    ({"min_tissue_fraction": 1.5}, "1.5"),
    ({"selection_level": "coarsest"}, "coarsest"),
    ({"origin_step": 0}, "0"),
    ({"concurrency": 0}, "0"),
    ({"segmentation": "yes"}, "yes"),
    ({"segmentation": True}, "True"),
    ({"segmentation": "v1.0/../x"}, "v1.0/../x"),
    ({"with_segmentation": True}, "with_segmentation"),
    ({"crop_sizes": [1, 1, 1]}, "crop_sizes"),
])
def test_static_param_errors_name_the_value(section, named):
    with pytest.raises(InvalidParameterError, match="hemibrain") as err:
        SOURCE.parse_params({"seed": 1, **section})
    assert named in str(err.value)


@pytest.mark.parametrize(("params", "named"), [
    ({"crop_size": [50000, 64, 64]}, "[50000, 64, 64]"),
    ({"crop_size": [64, 64, 34428]}, "[64, 64, 34428]"),  # x is one voxel larger than the EM's 34427
    ({"crop_size": [64, 39553, 64]}, "[64, 39553, 64]"),  # fits the EM's y (39725), not the segmentation's
    ({"level": 9}, "level 9"),
    ({"level": 8, "crop_size": [163, 64, 64]}, "[163, 64, 64]"),  # fits level 0, not level 8 (162 in z)
    ({"selection_level": 9}, "selection_level 9"),
    ({"selection_level": 5}, "too large to read whole"),
])
def test_info_dependent_errors_come_before_any_voxel_request(replica, tmp_path, params, named):
    with pytest.raises(InvalidParameterError) as err:
        run_crop(replica, tmp_path, **params)
    assert named in str(err.value)
    assert [r for r in replica.faults.requests_seen if r.split()[1].endswith("/info")]
    assert voxel_requests(replica) == []
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_unreachable_tissue_fraction_fails_clearly_without_output(replica, tmp_path):
    # The replica's tissue is 384^3 voxels: a 512^3 window can never be all tissue.
    with pytest.raises(InvalidParameterError, match="min_tissue_fraction 1.0") as err:
        run_crop(replica, tmp_path, crop_size=[512, 512, 512], min_tissue_fraction=1.0, max_attempts=5)
    assert "best" in str(err.value)
    assert not (tmp_path / "data" / "hemibrain_crop.zarr").exists()
    # Only the coarse selection scale was read, never a chunk of scale 0.
    assert not [r for r in voxel_requests(replica) if "/8.0x8.0x8.0/" in r]


def test_failure_mid_crop_keeps_previous_output_and_leaves_no_partial(replica, tmp_path):
    _, out = run_crop(replica, tmp_path, seed=1, origin_step=8, segmentation=None)
    before = all_files(out)
    replica.faults.path_contains = "/8.0x8.0x8.0/"
    replica.faults.status, replica.faults.status_count = 500, 10**6
    with pytest.raises(DownloadError, match="HTTP code 500"):
        run_crop(replica, tmp_path, DownloadConfig(retries=0, backoff_s=0.0), seed=2, origin_step=8,
                 segmentation=None)
    assert all_files(out) == before
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["hemibrain_crop.zarr"]


# ------------------------------------------------------------------------- what the real servers do
def test_selection_copes_with_the_noisy_background_and_records_it(replica, tmp_path):
    metrics, out = run_crop(replica, tmp_path, seed=11, origin_step=8, min_tissue_fraction=0.95)
    background = zarr.open_group(str(out), mode="r").attrs["emdata"]["selection"]["background"]
    counts = background["low_value_counts"]
    assert len(counts) == 22 and background["threshold"] == 10
    # The coarse scale holds exact zeros (absent shards and chunks: most of the box) and a noisy halo in 1..10.
    assert background["zero_fraction"] > 0.99 and sum(counts[1:11]) > 0
    assert background["noise_p50"] == metrics["background_noise_p50"] < 5
    assert background["reaches_threshold"] is metrics["background_reaches_threshold"] is False
    # JPEG rings at the tissue's edge above the threshold: those coarse voxels are refused as tissue.
    assert sum(counts[11:]) > 0 and background["edge_voxels_refused"] > 0
    # The crop is tissue at full resolution, not the halo's noise.
    _, arrays = ngff.open_multiscale(out)
    em = arrays[0][:]
    assert (em > 10).mean() > 0.9


def test_threshold_below_the_noise_is_flagged(replica, tmp_path, caplog):
    # At 1, the halo's coarse voxels (about 2) count as tissue: the measurement says the noise reaches it.
    caplog.set_level("WARNING", logger="emdata.sources.hemibrain")
    metrics, out = run_crop(replica, tmp_path, background_max_value=1, min_tissue_fraction=0.5, segmentation=None)
    assert metrics["background_reaches_threshold"] is True and metrics["background_noise_p50"] == 1
    assert "reaches background_max_value 1" in caplog.text
    attrs = zarr.open_group(str(out), mode="r").attrs["emdata"]["selection"]
    assert attrs["background"]["reaches_threshold"] is True


def test_threshold_above_all_tissue_fails_before_any_crop_voxel(replica, tmp_path):
    with pytest.raises(InvalidParameterError, match="background_max_value 254: no voxel") as err:
        run_crop(replica, tmp_path, background_max_value=254)
    assert "scale 7" in str(err.value)
    assert not [r for r in voxel_requests(replica) if "/8.0x8.0x8.0/" in r]


def test_draws_within_the_tissue_box_equal_draws_over_the_whole_scale():
    from emdata.formats.precomputed import ScaleInfo
    from emdata.sources.hemibrain import (CropPlan, _bounds, choose_origin, mask_integral, tissue_integral)

    rng = np.random.default_rng(5)
    coarse_em = np.zeros((40, 36, 32), np.uint8)
    coarse_em[10:20, 12:25, 5:14] = rng.integers(0, 60, (10, 13, 9), dtype=np.uint8)
    coarse = ScaleInfo(4, "c", (128.0, 128.0, 128.0), (2, 0, 1), coarse_em.shape, (64, 64, 64), "jpeg")
    fine = ScaleInfo(0, "f", (8.0, 8.0, 8.0), (32, 0, 16), (640, 576, 512), (64, 64, 64), "jpeg")
    params = SOURCE.parse_params({"seed": 3, "crop_size": [40, 48, 56], "min_tissue_fraction": 0.6,
                                  "origin_step": 8})
    plan = CropPlan(em=None, em_info={}, em_scale=fine, selection_scale=coarse,  # type: ignore[arg-type]
                    selection_note=None, segmentation_version=None, segmentation=None, segmentation_info=None,
                    segmentation_scale=None, origin_lo=fine.voxel_offset,
                    origin_hi=tuple(e - c for e, c in zip(fine.end, params.crop_size)))  # type: ignore[arg-type]
    whole = choose_origin(params, plan, tissue_integral(coarse_em, 10))
    mask = coarse_em > 10
    box = _bounds(mask, 0)
    import dataclasses
    within = dataclasses.replace(coarse, voxel_offset=tuple(o + b.start for o, b in zip(coarse.voxel_offset, box)),
                                 size=tuple(b.stop - b.start for b in box))
    assert choose_origin(params, plan, mask_integral(mask[box]), within) == whole
    assert whole.tissue_fraction >= 0.6


def _crop_shard(tree: Path, origin: list[int], crop: list[int], level: int = 0) -> str:
    """The shard file (relative to the EM volume) holding the crop's first chunk."""
    info = parse_info(json.loads((tree / BUCKET_DIR / EM_PATH / "info").read_text()), EM_URL)
    return info.scales[level].chunk_files(origin, [o + 1 for o in origin])[0]


@pytest.mark.parametrize("missing", ["crop", "selection"])
def test_403_on_a_missing_shard_fails_naming_it(replica, replica_copy, replica_copy_server, tmp_path, missing):
    metrics, _ = run_crop(replica, tmp_path / "ok", segmentation=None)
    origin = metrics["crop_origin_voxels"]
    name = _crop_shard(replica_copy, origin, CROP) if missing == "crop" else "1024.0x1024.0x1024.0/0000.shard"
    (replica_copy / BUCKET_DIR / EM_PATH / name).unlink()
    replica_copy_server.set_behaviour({"missing_status": {"storage.googleapis.com": 403}})
    with pytest.raises(DownloadError) as err:
        run_crop(replica_copy_server, tmp_path / "bad", segmentation=None)
    text = str(err.value)
    assert f"{EM_URL}/{name} (fetched as http://127.0.0.1:" in text
    assert "403 Forbidden" in text and "cannot be told from a forbidden one" in text
    assert not (tmp_path / "bad" / "data" / "hemibrain_crop.zarr").exists()


def test_stage_run_as_users_run_it_exits_nonzero_on_a_403(replica, replica_copy, replica_copy_server, tmp_path):
    import subprocess
    import sys

    import yaml

    repo = Path(__file__).resolve().parents[1]
    metrics, _ = run_crop(replica, tmp_path / "ok", segmentation=None)
    name = _crop_shard(replica_copy, metrics["crop_origin_voxels"], CROP)
    (replica_copy / BUCKET_DIR / EM_PATH / name).unlink()
    replica_copy_server.set_behaviour({"missing_status": {"storage.googleapis.com": 403}})
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["mirror"] = {"url": replica_copy_server.base_url, "serves": "replica"}
    params["download"] = {**params.get("download", {}), "retries": 1, "backoff_s": 0.0}
    params["hemibrain"].update(seed=7, crop_size=CROP, segmentation=None)
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, str(repo / "stages" / "hemibrain.py")], cwd=work, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert f"{EM_URL}/{name}" in proc.stderr and "answered 403 Forbidden" in proc.stderr
    assert not (work / "data" / "hemibrain_crop.zarr").exists()
    assert not (work / find("hemibrain").metrics).exists()


def test_404_on_a_missing_shard_reads_as_empty_space(replica, replica_copy, replica_copy_server, tmp_path):
    metrics, _ = run_crop(replica, tmp_path / "ok", segmentation=None)
    origin = metrics["crop_origin_voxels"]
    name = _crop_shard(replica_copy, origin, CROP)
    (replica_copy / BUCKET_DIR / EM_PATH / name).unlink()
    again, out = run_crop(replica_copy_server, tmp_path / "gap", segmentation=None)
    assert again["crop_origin_voxels"] == origin  # the selection scale is intact
    _, arrays = ngff.open_multiscale(out)
    em = arrays[0][:]
    np.testing.assert_array_equal(em, crop_of(replica_view(replica_copy, EM_PATH, 0), origin, CROP))
    assert (em[:64, :64, :64] == 0).all()  # the first chunk is gone with its shard


@pytest.mark.parametrize("gzipped", ["/info", "/emdata/"])
def test_gzip_content_encoding(replica, tmp_path, gzipped):
    # On demand, the replica gzips responses on the fly (Content-Encoding: gzip, ranges of the gzip stream).
    # The info documents are decoded (they are parsed); a shard's ranges cannot be: the run stops naming it.
    replica.set_behaviour({"gzip_paths": [gzipped]})
    if gzipped == "/info":
        metrics, out = run_crop(replica, tmp_path)
        assert ngff.open_multiscale(out)[1][0].shape == tuple(CROP)
        return
    with pytest.raises(DownloadError) as err:
        run_crop(replica, tmp_path, segmentation=None)
    assert ".shard" in str(err.value) and "Content or Transfer-Encoding" in str(err.value)
    assert not (tmp_path / "data" / "hemibrain_crop.zarr").exists()


@pytest.mark.parametrize(("path", "value", "named"), [
    (("scales", 0, "sharding", "shard_bits"), 70, "scales[0].sharding.shard_bits"),
    (("scales", 1, "sharding", "minishard_bits"), 40, "scales[1].sharding.minishard_bits"),
    (("scales", 2, "sharding", "preshift_bits"), -1, "scales[2].sharding.preshift_bits"),
    (("scales", 0, "sharding", "hash"), "md5", "scales[0].sharding.hash"),
    (("scales", 0, "sharding", "data_encoding"), "zstd", "scales[0].sharding.data_encoding"),
    (("scales", 3, "sharding", "@type"), "sharded_v2", "scales[3].sharding.@type"),
    (("scales", 0, "size"), [2**40, 10, 10], "scales[0].size"),
    (("scales", 0, "size"), [34427.5, 10, 10], "scales[0].size"),
    (("scales", 0, "chunk_sizes"), [[64, 64, 2**20]], "scales[0].chunk_sizes[0]"),
    (("scales", 0, "jpeg_quality"), 101, "scales[0].jpeg_quality"),
    (("scales", 0, "encoding"), "webp", "scales[0].encoding"),
    (("data_type",), "complex64", "data_type"),
    (("scales", 0, "key"), "../../other-bucket/x", "scales[0].key"),
    (("scales", 0, "key"), None, "scales[0].key"),
])
def test_out_of_bounds_info_fails_before_any_voxel(replica_copy, replica_copy_server, tmp_path, path, value, named):
    info_path = replica_copy / BUCKET_DIR / EM_PATH / "info"
    doc = json.loads(info_path.read_text())
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    info_path.write_text(json.dumps(doc))
    with pytest.raises(SourceMismatchError) as err:
        run_crop(replica_copy_server, tmp_path)
    assert f"{EM_URL}/info" in str(err.value) and named in str(err.value)
    assert voxel_requests(replica_copy_server) == []


def test_sharding_bits_beyond_64_are_refused():
    doc = json.loads((Path(__file__).parent / "fixtures" / "reference" / "sources" /
                      "hemibrain_v1.0_segmentation_info.json").read_text())
    assert parse_info(doc, SEGMENTATION_URL).scales[0].sharding.shard_bits == 15  # type: ignore[union-attr]
    doc["scales"][0]["sharding"].update(preshift_bits=30, minishard_bits=20, shard_bits=20)
    with pytest.raises(SourceMismatchError, match=r"scales\[0\].sharding: preshift_bits \+ minishard_bits"):
        parse_info(doc, SEGMENTATION_URL)


# ------------------------------------------------------------------------------------------ live (opt-in)
@pytest.mark.network
def test_live_info_matches_what_the_code_expects():
    from emdata.acquire.download import Downloader
    from emdata.formats.precomputed import parse_info
    downloader = Downloader(DownloadConfig(retries=2), progress=False)
    em = parse_info(downloader.fetch_json(f"{EM_URL}/info"), EM_URL)
    assert em.data_type == "uint8" and em.num_channels == 1
    assert em.scales[0].resolution_nm == (8.0, 8.0, 8.0)
    assert all(s > 30000 for s in em.scales[0].size)
    assert all(s.sharding is not None and s.sharding.hash == "identity" for s in em.scales)  # what the replica does
    seg = parse_info(downloader.fetch_json(f"{SEGMENTATION_URL}/info"), SEGMENTATION_URL)
    assert seg.data_type == "uint64" and seg.scale_with_resolution((8.0, 8.0, 8.0)) is not None


# ------------------------------------------------------------------------------- selection arithmetic
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), shape=st.tuples(*[st.integers(1, 12)] * 3), data=st.data())
def test_window_fraction_equals_brute_force(seed, shape, data):
    from emdata.formats.precomputed import ScaleInfo
    from emdata.sources.hemibrain import tissue_integral, tissue_window_fraction

    coarse_em = np.random.default_rng(seed).integers(0, 30, shape, dtype=np.uint8)
    offset = (3, 5, 7)
    coarse = ScaleInfo(5, "c", (32.0, 32.0, 32.0), offset, shape, (64, 64, 64), "jpeg")
    fine = ScaleInfo(0, "f", (8.0, 8.0, 8.0), (0, 0, 0), (1000, 1000, 1000), (64, 64, 64), "jpeg")
    origin = [data.draw(st.integers(4 * o - 8, 4 * (o + n) + 4)) for o, n in zip(offset, shape, strict=True)]
    crop = [data.draw(st.integers(1, 40)) for _ in range(3)]
    got = tissue_window_fraction(tissue_integral(coarse_em, 10), coarse, fine, origin, crop)
    lo = [a // 4 for a in origin]
    hi = [-(-(a + c) // 4) for a, c in zip(origin, crop, strict=True)]
    count = 0
    for idx in np.ndindex(*[b - a for a, b in zip(lo, hi, strict=True)]):
        local = [a + i - o for a, i, o in zip(lo, idx, offset, strict=True)]
        if all(0 <= v < n for v, n in zip(local, shape, strict=True)):
            count += int(coarse_em[tuple(local)] > 10)
    assert got == pytest.approx(count / np.prod([b - a for a, b in zip(lo, hi, strict=True)]))


@settings(max_examples=60, deadline=None)
@given(lo=st.tuples(*[st.integers(-50, 50)] * 3), span=st.tuples(*[st.integers(0, 300)] * 3),
       offset=st.tuples(*[st.integers(-60, 60)] * 3), step=st.integers(1, 70))
def test_step_range_stays_inside_the_allowed_origins(lo, span, offset, step):
    from emdata.sources.hemibrain import _step_range

    hi = [a + s for a, s in zip(lo, span, strict=True)]
    m_lo, m_hi = _step_range(lo, hi, offset, step)
    for a, b, o, ml, mh in zip(lo, hi, offset, m_lo, m_hi, strict=True):
        inside = [m for m in range(-200, 500) if a <= o + m * step <= b]
        assert (inside[0], inside[-1]) == (ml, mh) if inside else ml > mh


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32), shape=st.tuples(*[st.integers(1, 9)] * 3), data=st.data())
def test_kth_tissue_voxel_is_the_kth_in_c_order(seed, shape, data):
    from emdata.sources.hemibrain import _tissue_voxel, tissue_integral

    coarse_em = np.random.default_rng(seed).integers(0, 14, shape, dtype=np.uint8)
    voxels = np.argwhere(coarse_em > 10)
    if not len(voxels):
        return
    k = data.draw(st.integers(0, len(voxels) - 1))
    assert _tissue_voxel(tissue_integral(coarse_em, 10), k) == tuple(voxels[k])


def test_the_background_histogram_counts_like_bincount():
    from emdata.sources.hemibrain import _histogram_uint8

    rng = np.random.default_rng(4)
    coarse = rng.integers(0, 256, (37, 41, 29), dtype=np.uint8)
    want = np.bincount(coarse.ravel(), minlength=256)
    for step in (1, 1000, 1 << 16, 1 << 30):
        np.testing.assert_array_equal(_histogram_uint8(coarse, step=step), want)
    np.testing.assert_array_equal(_histogram_uint8(coarse[:, ::3]), np.bincount(coarse[:, ::3].ravel(),
                                                                                minlength=256))


def test_background_tasks_hand_back_their_value_or_their_error():
    """The info and open requests that run beside the selection (``_start``): the value, or the exception
    raised where the result is asked for; on a daemon thread, so a request that stalls never holds the exit."""
    import threading

    from emdata.sources.hemibrain import _start

    seen = []

    def task(x):
        seen.append(threading.current_thread())
        return x * 2

    assert _start(task, 21).result(timeout=10) == 42
    assert seen[0] is not threading.main_thread() and seen[0].daemon

    def fail():
        raise DownloadError("opening hemibrain EM at http://127.0.0.1/x failed")

    with pytest.raises(DownloadError, match="opening hemibrain EM"):
        _start(fail).result(timeout=10)
