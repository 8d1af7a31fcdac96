"""Pyramids: near-isotropic factors, exact integer mean, mode and nearest, streaming equal to a second pass."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import zarr

from emdata import ngff, pyramid
from emdata.errors import InvalidParameterError, SourceMismatchError


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16"])
@pytest.mark.parametrize("factors", [(2, 2, 2), (1, 2, 2), (2, 1, 1), (1, 1, 2)])
@pytest.mark.parametrize("slab_bytes", [None, 1, 700], ids=["one-slab", "one-cell-per-slab", "slabs-of-a-few-planes"])
def test_integer_mean_is_identical_to_the_float32_rint_mean(dtype, factors, slab_bytes, monkeypatch):
    if slab_bytes is not None:  # a large block is reduced in z-slabs: the same voxels however it is cut
        monkeypatch.setattr(pyramid, "_SLAB_BYTES", slab_bytes)
    info = np.iinfo(dtype)
    rng = np.random.default_rng(7)
    # Extremes and small ranges: exact halves (ties) are frequent, negative sums round toward even too.
    for lo, hi in ((info.min, info.max), (info.min, info.min + 3), (-2, 3) if info.min < 0 else (0, 3)):
        block = rng.integers(lo, hi, (9, 14, 11), endpoint=True).astype(dtype)
        padded = np.pad(block, [(0, s % f) for s, f in zip(block.shape, factors, strict=True)], mode="edge")
        expected = pyramid._mean_float32(padded, factors)
        got = pyramid.mean(block, factors)
        assert got.dtype == block.dtype
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("scratch_max", [None, 0], ids=["thread-scratch", "buffer-per-call"])
def test_mean_from_many_threads_gives_new_arrays_equal_to_one_pass(scratch_max, monkeypatch):
    """The slabs' sums go through per-thread scratch: threads at once get each their own block's mean, and every
    result is a new array (never the scratch), equal to the float32 rint mean of the whole block."""
    from concurrent.futures import ThreadPoolExecutor

    if scratch_max is not None:
        monkeypatch.setattr(pyramid, "_SCRATCH_MAX_BYTES", scratch_max)
    monkeypatch.setattr(pyramid, "_SLAB_BYTES", 4096)  # several slabs per block
    rng = np.random.default_rng(11)
    blocks = [rng.integers(0, 255, (24, 40, 72), endpoint=True).astype(np.uint8) for _ in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda b: pyramid.mean(b, (2, 2, 2)), blocks * 3))
    for block, got in zip(blocks * 3, results, strict=True):
        np.testing.assert_array_equal(got, pyramid._mean_float32(block, (2, 2, 2)))
    assert not any(np.shares_memory(a, b) for i, a in enumerate(results) for b in results[i + 1:])


def test_mean_rounds_half_to_even():
    block = np.array([1, 2, 1, 2, 1, 2, 1, 2], np.uint8).reshape(2, 2, 2)  # mean 1.5 -> 2
    assert pyramid.mean(block, (2, 2, 2)).item() == 2
    block = np.array([2, 3] * 4, np.uint8).reshape(2, 2, 2)  # 2.5 -> 2
    assert pyramid.mean(block, (2, 2, 2)).item() == 2
    block = np.array([-3, -2] * 4, np.int16).reshape(2, 2, 2)  # -2.5 -> -2
    assert pyramid.mean(block, (2, 2, 2)).item() == -2


def test_mode_takes_the_majority_label_and_nearest_the_first_voxel():
    cell = np.array([7, 7, 7, 7, 7, 3, 3, 3], np.uint64).reshape(2, 2, 2)
    block = np.tile(cell, (2, 3, 2))
    block[2:4, 0:2, 0:2] = np.array([0, 9, 9, 9, 0, 0, 9, 0], np.uint64).reshape(2, 2, 2)  # 9 wins over 0: 4-4?
    out = pyramid.mode(block, (2, 2, 2))
    assert out.shape == (2, 3, 2) and out.dtype == np.uint64
    assert (out[0] == 7).all() and out[1, 0, 0] in (0, 9) and (out[1, 1:] == 7).all()
    assert (pyramid.nearest(block, (2, 2, 2)) == block[::2, ::2, ::2]).all()
    # Anisotropic (1, 2, 2): majority in each 2x2 of a slice.
    sl = np.array([[5, 5], [5, 1]], np.uint32)[None]
    assert pyramid.mode(sl, (1, 2, 2)).item() == 5
    assert pyramid.mode(sl.transpose(1, 0, 2), (2, 1, 2)).item() == 5
    assert pyramid.mode(sl.transpose(1, 2, 0), (2, 2, 1)).item() == 5
    pair = np.array([4, 6], np.uint8).reshape(2, 1, 1)  # no majority in a pair: the first voxel
    assert pyramid.mode(pair, (2, 1, 1)).item() == 4


def test_anisotropic_plan_keeps_z_until_the_plane_is_as_coarse():
    # EMPIAR-11759: 16 sections of 50 nm, 8 nm pixels.
    factors = pyramid.plan_factors((16, 4096, 4096), (50.0, 8.0, 8.0))
    voxel = np.array([50.0, 8.0, 8.0])
    sizes = []
    for cum in pyramid.cumulative(factors):
        v = voxel * cum
        sizes.append(tuple(v))
        if v[1] < 50:
            assert cum[0] == 1, f"z halved at {v} nm before y/x reached z"
    assert sizes[:5] == [(50, 8, 8), (50, 16, 16), (50, 32, 32), (50, 64, 64), (100, 128, 128)]
    assert max(pyramid.shapes((16, 4096, 4096), factors)[-1]) <= 64
    # Isotropic volumes keep today's levels: 2 on every axis, default_n_levels of them.
    iso = pyramid.plan_factors((165, 768, 1024), (5.0, 5.0, 5.0))
    assert iso == [(1, 1, 1)] + [(2, 2, 2)] * (ngff.default_n_levels((165, 768, 1024)) - 1)
    # A one-voxel axis never halves; asking for more levels than exist is refused with the shape.
    assert all(f[0] == 1 for f in pyramid.plan_factors((1, 300, 300), (4.0, 4.0, 4.0)))
    with pytest.raises(InvalidParameterError, match=r"cannot make 5 levels of shape \(1, 2, 2\)"):
        pyramid.plan_factors((1, 2, 2), (1.0, 1.0, 1.0), n_levels=5)


def test_per_axis_scale_and_translation_in_the_multiscales(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (6, 40, 40), dtype=np.uint8)
    g = ngff.Geometry((50.0, 8.0, 8.0), (100.0, 0.0, 0.0))
    root = zarr.open_group(str(tmp_path / "a.zarr"), mode="w", zarr_format=3)
    mask = (data > 128).astype(np.uint8)
    figures = ngff.write_image(root, name="a", source=data, geometry=g, chunks=(8, 8, 8), shards=(16, 16, 16),
                               n_levels=4, labels=[ngff.Label("m", mask, method="nearest")], what="a")
    assert figures["factors"] == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [1, 2, 2]]
    ms = ngff.multiscales(root)
    t = [d["coordinateTransformations"] for d in ms["datasets"]]
    assert t[1] == [{"type": "scale", "scale": [50.0, 16.0, 16.0]},
                    {"type": "translation", "translation": [100.0, 4.0, 4.0]}]
    assert t[3][0]["scale"] == [50.0, 64.0, 64.0] and t[3][1]["translation"] == [100.0, 28.0, 28.0]
    lms, larrays = ngff.open_multiscale(tmp_path / "a.zarr", label="m")
    assert lms["datasets"][3]["coordinateTransformations"][1]["translation"] == [100.0, 0.0, 0.0]  # nearest
    assert [a.shape for a in larrays] == [(6, 40, 40), (6, 20, 20), (6, 10, 10), (6, 5, 5)]
    np.testing.assert_array_equal(larrays[3][...], mask[:, ::8, ::8])


@pytest.mark.parametrize("method,dtype", [("mean", "uint16"), ("mode", "uint64"), ("nearest", "uint8")])
def test_streaming_pyramid_equals_a_second_pass(tmp_path, method, dtype):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 4 if method != "mean" else 60000, (37, 70, 53)).astype(dtype)
    g = ngff.Geometry((30.0, 10.0, 10.0))
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    figures = ngff.write_image(root, name="s", source=data, geometry=g, chunks=(8, 8, 8), shards=(16, 16, 16),
                               method=method, n_levels=4, what="s")
    factors = figures["factors"]
    assert factors == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 1, 1]]  # 30 x 20 x 20, 30 x 40 x 40, 60 x 40 x 40 nm
    ref = zarr.open_group(str(tmp_path / "r.zarr"), mode="w", zarr_format=3)
    rarrays = ngff.create_multiscale(ref, name="r", shape=data.shape, dtype=data.dtype, geometry=g, chunks=(8, 8, 8),
                                     shards=(16, 16, 16), downsampling=method, factors=factors)
    rarrays[0][...] = data
    ngff.write_pyramid(rarrays, method, factors)
    arrays = [root[str(i)] for i in range(4)]
    for a, r in zip(arrays, rarrays, strict=True):
        np.testing.assert_array_equal(a[...], r[...])


def test_pyramid_memory_does_not_grow_with_the_volume(tmp_path):
    peaks = []
    for n in (64, 128):  # one volume twice the other
        data = np.random.default_rng(n).integers(0, 255, (64, 64, n), dtype=np.uint8)
        root = zarr.open_group(str(tmp_path / f"m{n}.zarr"), mode="w", zarr_format=3)
        figures = ngff.write_image(root, name="m", source=data, geometry=ngff.Geometry((4, 4, 4)), chunks=(8, 8, 8),
                                   shards=(16, 16, 16), n_levels=3, what="m")
        peaks.append(figures["pyramid_peak_bytes"])
    assert peaks[0] == peaks[1] <= 2 * 16**3  # at most one unfinished shard per upper level
    assert peaks[0] > 0


def _tree(path):
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_tensorstore_backend_writes_what_zarr_python_reads_identically(tmp_path):
    rng = np.random.default_rng(5)
    data = rng.integers(0, 255, (40, 72, 50), dtype=np.uint8)
    seg = (data // 64).astype(np.uint64)
    seg[:, :30] = 0  # whole zero chunks: neither backend stores them
    outs = {}
    for name, backend in (("z", "zarr"), ("t1", "tensorstore"), ("t2", "tensorstore")):
        root = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="w", zarr_format=3)
        fig = ngff.write_image(root, name="x", source=data, geometry=ngff.Geometry((4, 4, 4)), chunks=(8, 8, 8),
                               shards=(16, 16, 16), labels=[ngff.Label("seg", seg)], backend=backend, what="x")
        assert fig["backend"] == backend
        outs[name] = _tree(tmp_path / f"{name}.zarr")
    assert outs["t1"] == outs["t2"]  # deterministic
    assert sorted(outs["z"]) == sorted(outs["t1"])
    # Same metadata; shards hold the same chunk bytes, in C order (tensorstore) instead of Morton (zarr-python).
    assert {k: v for k, v in outs["z"].items() if k.endswith("zarr.json")} == \
        {k: v for k, v in outs["t1"].items() if k.endswith("zarr.json")}
    z = zarr.open_group(str(tmp_path / "z.zarr"), mode="r")
    t = zarr.open_group(str(tmp_path / "t1.zarr"), mode="r")
    for key in [d["path"] for d in ngff.multiscales(z)["datasets"]]:
        np.testing.assert_array_equal(z[key][...], t[key][...])
        np.testing.assert_array_equal(z[f"labels/seg/{key}"][...], t[f"labels/seg/{key}"][...])
    assert json.loads((tmp_path / "t1.zarr" / "0" / "zarr.json").read_text())["codecs"][0]["name"] == "sharding_indexed"


def test_bad_method_backend_and_factors_are_named(tmp_path):
    root = zarr.open_group(str(tmp_path / "b.zarr"), mode="w", zarr_format=3)
    data = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(InvalidParameterError, match="'median'"):
        ngff.write_image(root, name="b", source=data, geometry=ngff.Geometry((1, 1, 1)), method="median", what="b")
    with pytest.raises(InvalidParameterError, match="'zarrita'"):
        ngff.write_image(root, name="b", source=data, geometry=ngff.Geometry((1, 1, 1)), backend="zarrita", what="b")
    with pytest.raises(InvalidParameterError, match=r"\(1, 3, 1\)"):
        ngff.write_image(root, name="b", source=data, geometry=ngff.Geometry((1, 1, 1)),
                         factors=[(1, 1, 1), (1, 3, 1)], what="b")


@pytest.mark.parametrize("factors", [(2, 2, 2), (1, 2, 2), (2, 1, 2), (2, 2, 1)])
def test_mode_agrees_with_brute_force_wherever_the_majority_is_unique(factors):
    rng = np.random.default_rng(11)
    block = rng.integers(0, 3, (8, 10, 12)).astype(np.uint64)
    out = pyramid.mode(block, factors)
    fz, fy, fx = factors
    checked = 0
    for z, y, x in np.ndindex(out.shape):
        cell = block[z * fz:(z + 1) * fz, y * fy:(y + 1) * fy, x * fx:(x + 1) * fx].ravel()
        values, counts = np.unique(cell, return_counts=True)
        if (counts == counts.max()).sum() == 1:
            assert out[z, y, x] == values[counts.argmax()], (z, y, x, cell)
            checked += 1
    assert checked > out.size // 3


@pytest.mark.parametrize("factors", [(2, 2, 2), (1, 2, 2), (2, 2, 1)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint64])
def test_mode_of_a_view_is_the_mode_of_its_copy(factors, dtype):
    """write_image hands the pyramid boxes sliced out of the source (views, not contiguous): tinybrain read
    such a view's memory as if contiguous and gave wrong labels (silently) until pyramid.mode copied it."""
    seg = (np.arange(24 * 40 * 72, dtype=np.uint64) // 700 % 251).astype(dtype).reshape(24, 40, 72)
    for view in (seg[:16, :16, :16], seg[8:24, 16:40, 24:72], seg[:, ::2, :], seg.transpose(2, 1, 0)[:16]):
        np.testing.assert_array_equal(pyramid.mode(view, factors), pyramid.mode(view.copy(), factors))


@pytest.mark.parametrize("reader", ["direct", "tensorstore"])
def test_a_wrong_voxel_on_disk_is_reported_with_the_box(tmp_path, monkeypatch, reader):
    """Tensorstore is handed the right shard but one voxel reaches the file wrong: the read-back (decoded from
    the shard file directly, or through tensorstore where that reader does not apply) fails naming the box."""
    real_init = ngff._Sink.__init__

    class Proxy:
        def __init__(self, store):
            self.store = store

        def __getitem__(self, box):
            view = self.store[box]

            def write(data, **kwargs):
                wrong = np.array(data)
                wrong.flat[wrong.size // 2] ^= 1
                return view.write(wrong)

            return type("View", (), {"write": lambda _, d, **kw: write(d, **kw), "read": lambda _: view.read()})()

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        if self.store is not None and self.array.path.endswith("labels/seg/1"):
            self.store = Proxy(self.store)

    monkeypatch.setattr(ngff._Sink, "__init__", init)
    if reader == "tensorstore":
        monkeypatch.setattr(ngff._Sink, "_verify_direct", lambda self, box, data: False)  # the tensorstore read-back
    data = np.ones((16, 16, 16), np.uint8)
    root = zarr.open_group(str(tmp_path / "v.zarr"), mode="w", zarr_format=3)
    with pytest.raises(SourceMismatchError, match=r"level 1 of label 'seg' of the volume does not read back equal "
                                                  r"at \(slice\(0, 8") as err:
        ngff.write_image(root, name="v", source=data, geometry=ngff.Geometry((1, 1, 1)), chunks=(4, 4, 4),
                         shards=(8, 8, 8), n_levels=2, labels=[ngff.Label("seg", data)], what="the volume")
    # The flipped voxel is the middle one of the 8^3 shard: chunk (1, 0, 0) of its 4^3 chunks.
    assert ("(chunk (1, 0, 0))" in str(err.value)) == (reader == "direct")


def test_a_damaged_shard_file_fails_the_read_back(tmp_path, monkeypatch):
    """A byte of a shard file changed after tensorstore wrote it (before the read-back) is caught."""
    real_finish = ngff._Sink._finish

    def damage_then_finish(self, box, data, future):
        future.result()
        if self.array.path == "0":
            shard = next(p for p in sorted(self.path.rglob("*")) if p.is_file() and p.name != "zarr.json")
            raw = bytearray(shard.read_bytes())
            raw[len(raw) // 3] ^= 0xFF  # inside a compressed chunk
            shard.write_bytes(bytes(raw))
        return real_finish(self, box, data, future)

    monkeypatch.setattr(ngff._Sink, "_finish", damage_then_finish)
    data = np.random.default_rng(2).integers(0, 255, (16, 16, 16), dtype=np.uint8)
    root = zarr.open_group(str(tmp_path / "d.zarr"), mode="w", zarr_format=3)
    with pytest.raises(SourceMismatchError, match=r"the volume does not read back equal at .*\(chunk \("):
        ngff.write_image(root, name="d", source=data, geometry=ngff.Geometry((1, 1, 1)), chunks=(8, 8, 8),
                         shards=(16, 16, 16), n_levels=1, what="the volume")


def _tensorstore_blocks(source, origin, shape, *, max_inflight_bytes, what):
    """The read-ahead pattern proposed for emdata.acquire.tsio (reads of the next boxes in flight)."""
    from collections import deque

    dtype = np.dtype(source.dtype.numpy_dtype)

    def read(boxes):
        largest = max(int(np.prod([s.stop - s.start for s in box])) for box in boxes) * dtype.itemsize
        depth = max(1, int(max_inflight_bytes // largest))
        pending = deque()
        it = iter(boxes)

        def submit():
            box = next(it, None)
            if box is not None:
                src = tuple(slice(o + s.start, o + s.stop) for o, s in zip(origin, box, strict=True))
                pending.append((box, source[src].read()))

        for _ in range(depth):
            submit()
        try:
            while pending:
                box, future = pending.popleft()
                data = future.result()
                submit()
                yield data
        finally:
            for _, future in pending:
                future.cancel()

    return ngff.Blocks(tuple(shape), dtype, read)


def test_a_tensorstore_stream_with_reads_in_flight_writes_the_same_image(tmp_path):
    import tensorstore as ts

    rng = np.random.default_rng(9)
    big = rng.integers(0, 255, (40, 50, 60), dtype=np.uint8)
    src = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "src")}, "create": True,
                   "metadata": {"shape": list(big.shape), "data_type": "uint8",
                                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [16, 16, 16]}}}
                   }).result()
    src.write(big).result()
    origin, shape = (3, 5, 7), (33, 41, 50)
    crop = big[3:36, 5:46, 7:57]
    outs = []
    for name, source in (("a", crop), ("b", _tensorstore_blocks(src, origin, shape, max_inflight_bytes=20000,
                                                                 what="test source"))):
        root = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="w", zarr_format=3)
        ngff.write_image(root, name="x", source=source, geometry=ngff.Geometry((4, 4, 4)), chunks=(8, 8, 8),
                         shards=(16, 16, 16), what=name)
        outs.append(_tree(tmp_path / f"{name}.zarr"))
    assert outs[0] == outs[1] and len(outs[0]) > 10


@pytest.mark.parametrize("method,dtype", [("mode", "uint64"), ("mean", "uint8")])
def test_levels_written_piece_by_piece_hold_the_same_voxels_and_bytes(tmp_path, monkeypatch, method, dtype):
    """Levels whose shard is too large to buffer are written piece by piece: same voxels as the buffered writer,
    and (tensorstore lays a shard's chunks in index order) the same files, byte for byte."""
    rng = np.random.default_rng(11)
    data = rng.integers(0, 5 if method == "mode" else 255, (70, 64, 45)).astype(dtype)
    g = ngff.Geometry((8.0, 8.0, 8.0))
    trees, figures, direct = {}, {}, {}
    real_init = ngff._StreamingPyramid.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        direct[name] = list(self.direct)

    monkeypatch.setattr(ngff._StreamingPyramid, "__init__", spy)
    for name, limit in (("buffered", 2**40), ("direct", 0)):
        monkeypatch.setattr(ngff._StreamingPyramid, "DIRECT_BYTES", limit)
        root = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="w", zarr_format=3)
        figures[name] = ngff.write_image(root, name="p", source=data, geometry=g, chunks=(4, 4, 4),
                                         shards=(16, 16, 16), method=method, n_levels=4, what="p")
        trees[name] = _tree(tmp_path / f"{name}.zarr")
    # 16^3 shards: level 1's pieces are 8^3 (whole chunks), level 2's 4^3, level 3's 2^3 (not whole chunks).
    assert direct == {"buffered": [False] * 4, "direct": [False, True, True, False]}
    assert figures["direct"]["pyramid_peak_bytes"] < figures["buffered"]["pyramid_peak_bytes"]
    ref = zarr.open_group(str(tmp_path / "buffered.zarr"), mode="r")
    out = zarr.open_group(str(tmp_path / "direct.zarr"), mode="r")
    for level in range(4):
        np.testing.assert_array_equal(out[str(level)][...], ref[str(level)][...])
    assert trees["direct"] == trees["buffered"]


def test_labels_written_beside_the_image_give_the_same_files_and_figures(tmp_path):
    """``overlap_labels``: the labels stream on a second thread while the image does; same bytes, same figures
    (the seconds apart)."""
    rng = np.random.default_rng(13)
    data = rng.integers(0, 255, (40, 72, 50), dtype=np.uint8)
    seg = (data // 40).astype(np.uint64)
    mask = (data > 200).astype(np.uint8)
    trees, figures = {}, {}
    for name, overlap in (("seq", False), ("ovl", True), ("ovl2", True)):
        root = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="w", zarr_format=3)
        figures[name] = ngff.write_image(
            root, name="x", source=data, geometry=ngff.Geometry((4, 4, 4)), chunks=(8, 8, 8), shards=(16, 16, 16),
            labels=[ngff.Label("seg", seg), ngff.Label("mask", mask, method="nearest")], what="x",
            overlap_labels=overlap)
        trees[name] = _tree(tmp_path / f"{name}.zarr")
    assert trees["seq"] == trees["ovl"] == trees["ovl2"] and len(trees["seq"]) > 20

    def strip(fig):
        return {k: (strip(v) if isinstance(v, dict) else v) for k, v in fig.items()
                if "seconds" not in k and k != "MBps"}

    assert strip(figures["seq"]) == strip(figures["ovl"])
    assert list(figures["ovl"]["labels"]) == ["seg", "mask"]
    assert figures["ovl"]["labels"]["mask"]["mean"] == float(mask.mean())


@pytest.mark.parametrize("failing", ["image", "label"])
def test_a_failing_stream_stops_the_other_and_its_error_is_raised(tmp_path, failing):
    data = np.arange(32**3, dtype=np.uint32).reshape(32, 32, 32) % 251
    seg = data.astype(np.uint64)
    read = {"image": 0, "label": 0}

    def blocks(kind, arr):
        def gen(boxes):
            for i, box in enumerate(boxes):
                read[kind] += 1
                if kind == failing and i == 1:
                    raise SourceMismatchError(f"{kind} source broke")
                yield arr[box]
        return ngff.Blocks(arr.shape, arr.dtype, gen)

    root = zarr.open_group(str(tmp_path / "f.zarr"), mode="w", zarr_format=3)
    with pytest.raises(SourceMismatchError, match=f"{failing} source broke"):
        ngff.write_image(root, name="x", source=blocks("image", data.astype(np.uint8)),
                         geometry=ngff.Geometry((4, 4, 4)), chunks=(8, 8, 8), shards=(8, 8, 8),
                         labels=[ngff.Label("seg", blocks("label", seg))], what="x", overlap_labels=True)
    other = "label" if failing == "image" else "image"
    assert read[failing] == 2
    assert read[other] <= 64  # it stopped (or had finished) and returned; nothing hangs


@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint64", "int64"])
@pytest.mark.parametrize("reader", ["direct", "tensorstore"])
def test_the_mean_figure_is_the_same_however_it_is_summed(tmp_path, monkeypatch, dtype, reader):
    """A verified write sums integer voxels from the read-back's decoded chunks; an unverified one sums each
    shard as it passes; a read-back through tensorstore sums the shard: the same figure, exact where the sum
    fits, and where 64-bit sums wrap (huge label values) the same wrapped figure as before."""
    if reader == "tensorstore":
        from emdata import shards

        monkeypatch.setattr(shards.ShardReader, "for_array", classmethod(lambda cls, *a, **k: None))
    info = np.iinfo(dtype)
    rng = np.random.default_rng(17)
    small = rng.integers(max(int(info.min), -30000), min(int(info.max), 2**30), (37, 40, 29)).astype(dtype)
    want = float(sum(int(v) for v in small.ravel())) / small.size
    datas = [small]
    if info.bits == 64:  # sums past 2**64 wrap in every path alike
        datas.append(rng.integers(int(info.max) // 2, int(info.max), (37, 40, 29), endpoint=True, dtype=dtype))
    for i, data in enumerate(datas):
        means = []
        for verify in (True, False):
            root = zarr.open_group(str(tmp_path / f"{i}{verify}.zarr"), mode="w", zarr_format=3)
            means.append(ngff.write_image(root, name="s", source=data, geometry=ngff.Geometry((4, 4, 4)),
                                          chunks=(8, 8, 8), shards=(16, 16, 16), what="s", n_levels=1,
                                          verify=verify)["mean"])
        assert means[0] == means[1]
        if i == 0:
            assert means[0] == want
