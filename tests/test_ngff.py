"""OME-Zarr 0.5 writing: geometry of every level, sharding, labels, and what ome-zarr's reader sees."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import zarr
from ome_zarr_models.v05 import BioFormats2Raw as OzmBioFormats2Raw
from ome_zarr_models.v05 import Image as OzmImage
from ome_zarr_models.v05 import ImageLabel as OzmImageLabel
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Multiscales, Reader

from emdata import ngff
from emdata.access import open_array
from emdata.errors import InvalidParameterError, SourceMismatchError


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


# ----------------------------------------------------------------------------- write_image (one call)
def _old_sequence(path, image, mask, geometry, chunks, shards):
    """The sequence the sources ran before write_image: create, write, pyramid, read back; strided labels."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    arrays = ngff.create_multiscale(root, name="img", shape=image.shape, dtype=image.dtype, geometry=geometry,
                                    chunks=chunks, shards=shards)
    ngff.write_block_aligned(arrays[0], image)
    ngff.write_pyramid(arrays, "mean")
    ngff.check_read_back(arrays[0], image, "image")
    larrays = ngff.create_label(root, "mask", shape=mask.shape, dtype=mask.dtype, geometry=geometry,
                                chunks=chunks, shards=shards, colors={1: [255, 64, 64, 255]})
    ngff.write_block_aligned(larrays[0], mask)
    ngff.write_pyramid(larrays, "nearest")
    ngff.check_read_back(larrays[0], mask, "mask")
    return root


def _files(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _group_jsons(files):
    """zarr.json of groups (their attributes may gain keys); every array's zarr.json and chunk must match."""
    import json
    return {k for k, v in files.items() if k.endswith("zarr.json") and json.loads(v)["node_type"] == "group"}


def _blocks_of(array, lookahead=3):
    """A Blocks source like tensorstore streaming: reads ``lookahead`` boxes ahead of the consumer."""
    def read(boxes):
        pending = []
        it = iter(boxes)
        for box in itertools.islice(it, lookahead):
            pending.append(np.array(array[box]))
        for box in it:
            yield pending.pop(0)
            pending.append(np.array(array[box]))
        yield from pending
    return ngff.Blocks(array.shape, array.dtype, read)


@pytest.mark.parametrize("as_blocks", [False, True])
def test_write_image_is_byte_identical_to_the_old_sequence(tmp_path, as_blocks):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (45, 130, 97), dtype=np.uint8)  # odd sizes: edge-padded border cells
    mask = (image > 180).astype(np.uint8)
    g = ngff.Geometry((6.0, 6.0, 6.0), (3.0, 0.0, -6.0))
    chunks, shards = (16, 16, 16), (32, 32, 32)
    _old_sequence(tmp_path / "old.zarr", image, mask, g, chunks, shards)
    root = zarr.open_group(str(tmp_path / "new.zarr"), mode="w", zarr_format=3)
    src = _blocks_of(image) if as_blocks else image
    lab = _blocks_of(mask) if as_blocks else mask
    figures = ngff.write_image(root, name="img", source=src, geometry=g, chunks=chunks, shards=shards,
                               labels=[ngff.Label("mask", lab, colors={1: [255, 64, 64, 255]}, method="nearest")],
                               what="the test image", backend="zarr")
    old, new = _files(tmp_path / "old.zarr"), _files(tmp_path / "new.zarr")
    assert sorted(old) == sorted(new) and len(old) > 20
    groups = _group_jsons(old)
    assert groups == {"zarr.json", "labels/zarr.json", "labels/mask/zarr.json"}
    assert [k for k in old if k not in groups and old[k] != new[k]] == []
    assert figures["levels"] == 3 and figures["shape"] == [45, 130, 97]
    assert figures["factors"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
    assert figures["mean"] == pytest.approx(float(image.mean()))
    assert figures["labels"]["mask"]["levels"] == 3
    old_ms, new_ms = (ngff.multiscales(zarr.open_group(str(tmp_path / p), mode="r")) for p in ("old.zarr", "new.zarr"))
    assert new_ms["datasets"] == old_ms["datasets"] and new_ms["axes"] == old_ms["axes"]


def test_write_image_keeps_attrs_and_registers_labels(tmp_path):
    data = np.arange(20 * 24 * 28, dtype=np.uint16).reshape(20, 24, 28)
    seg = (data // 1000).astype(np.uint64)
    root = zarr.open_group(str(tmp_path / "a.zarr"), mode="w", zarr_format=3)
    ngff.write_image(root, name="a", source=data, geometry=ngff.Geometry((4.0, 4.0, 4.0)), chunks=(8, 8, 8),
                     shards=(16, 16, 16), n_levels=2, attrs={"emdata": {"source": "test"}},
                     labels=[ngff.Label("seg", seg, properties={1: {"name": "one"}})], what="a")
    back = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")
    assert back.attrs["emdata"] == {"source": "test"}
    assert ngff.label_names(back) == ["seg"]
    ms, arrays = ngff.open_multiscale(tmp_path / "a.zarr", label="seg")
    assert ms["type"] == "mode" and len(arrays) == 2
    # A mode-pooled voxel sits at the centre of its cell, like a mean: half a level-0 voxel on.
    assert ms["datasets"][1]["coordinateTransformations"][1]["translation"] == [2.0, 2.0, 2.0]
    np.testing.assert_array_equal(arrays[0][...], seg)
    label_attrs = ngff.ome_attrs(back["labels/seg"])["image-label"]
    # Colors and properties are completed to the same label values (background 0 transparent).
    assert label_attrs["properties"] == [{"label-value": 1, "name": "one"}, {"label-value": 0}]
    assert [c["label-value"] for c in label_attrs["colors"]] == [0, 1]
    assert label_attrs["colors"][0]["rgba"] == [0, 0, 0, 0] and label_attrs["colors"][1]["rgba"][3] == 255


def test_write_unit_halves_a_shard_over_the_budget_on_whole_chunks():
    mib = 2**20
    assert ngff.write_unit((256, 512, 512), (64, 64, 64), 8, 128 * mib) == (256, 256, 256)  # uint64 labels
    assert ngff.write_unit((256, 512, 512), (64, 64, 64), 1, 128 * mib) == (256, 512, 512)  # uint8: the shard
    assert ngff.write_unit((192, 512, 512), (64, 64, 64), 8, 32 * mib) == (192, 128, 128)  # 192 does not halve
    assert ngff.write_unit((64, 64, 64), (64, 64, 64), 8, 1) == (64, 64, 64)  # never below a chunk


def _write_seg_beside_image(path: Path, monkeypatch: pytest.MonkeyPatch | None,
                            backend: str = "tensorstore") -> list[tuple[str, tuple]]:
    """uint8 image + uint64 segmentation on (16, 32, 32) shards; with ``monkeypatch`` the budgets are scaled
    down so that the segmentation's shards (128 KiB) are written in 16^3 pieces (32 KiB) and its level 1 piece
    by piece. Returns the level-0 boxes handed to each writer."""
    puts: list[tuple[str, tuple]] = []
    if monkeypatch is not None:
        monkeypatch.setattr(ngff._Sink, "INFLIGHT_BYTES", 16**3 * 8)
        monkeypatch.setattr(ngff._StreamingPyramid, "DIRECT_BYTES", 16**3 * 8)
        put = ngff._Sink.put

        def spy(self, box, data):
            # a piece of a shard is handed over only once the previous piece is written and read back
            assert not (self.what.startswith("label") and self.pending), (self.what, box, len(self.pending))
            puts.append((self.what, tuple((b.start, b.stop) for b in box)))
            return put(self, box, data)

        monkeypatch.setattr(ngff._Sink, "put", spy)
    data = (np.arange(24 * 40 * 72) % 251).astype(np.uint8).reshape(24, 40, 72)
    seg = (np.arange(data.size, dtype=np.uint64) // 700 + 2**40).reshape(data.shape)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    ngff.write_image(root, name="a", source=data, geometry=ngff.Geometry((4.0, 4.0, 4.0)), chunks=(8, 8, 8),
                     shards=(16, 32, 32), n_levels=3, what="a", labels=[ngff.Label("seg", seg)],
                     backend=backend)  # type: ignore[arg-type]
    return puts


@pytest.mark.parametrize("backend", ngff.BACKENDS)
def test_a_label_wider_than_its_image_is_written_in_pieces_of_its_shards(tmp_path, monkeypatch, backend):
    """Labels share the image's shards; a uint64 segmentation's shard over the in-flight budget is written piece
    by piece into the shard file: the same voxels at every level as whole shards, the same bytes run to run."""
    _write_seg_beside_image(tmp_path / "whole.zarr", None)
    puts = _write_seg_beside_image(tmp_path / "a.zarr", monkeypatch, backend)
    _write_seg_beside_image(tmp_path / "b.zarr", monkeypatch, backend)
    seg_level0 = [box for what, box in puts if what.startswith("label 'seg'")]
    image_level0 = [box for what, box in puts if what == "a"]
    assert seg_level0 and all(b - a <= 16 for box in seg_level0 for a, b in box)  # pieces, not (16, 32, 32)
    assert any(box[2][1] - box[2][0] == 32 for box in image_level0)  # the uint8 image: whole shards
    for label in (None, "seg"):
        _, whole = ngff.open_multiscale(tmp_path / "whole.zarr", label=label)
        _, piecewise = ngff.open_multiscale(tmp_path / "a.zarr", label=label)
        for w, p in zip(whole, piecewise, strict=True):
            assert p.shards == w.shards
            np.testing.assert_array_equal(p[...], w[...])
    files = sorted(f.relative_to(tmp_path / "a.zarr") for f in (tmp_path / "a.zarr").rglob("*") if f.is_file())
    assert any("labels/seg/0/c" in str(f) for f in files)
    for f in files:
        assert (tmp_path / "a.zarr" / f).read_bytes() == (tmp_path / "b.zarr" / f).read_bytes(), f


def test_write_image_fails_loudly_naming_the_source_and_block(tmp_path, monkeypatch):
    data = np.ones((20, 20, 20), np.uint8)
    root = zarr.open_group(str(tmp_path / "b.zarr"), mode="w", zarr_format=3)
    short = ngff.Blocks(data.shape, data.dtype, lambda boxes: iter([data[boxes[0]]]))
    with pytest.raises(SourceMismatchError, match=r"the stream: the source ended after 1 of 8 blocks"):
        ngff.write_image(root, name="b", source=short, geometry=ngff.Geometry((1, 1, 1)), chunks=(10, 10, 10),
                         shards=(10, 10, 10), what="the stream")
    wrong = ngff.Blocks(data.shape, data.dtype, lambda boxes: (data[b].astype(np.int16) for b in boxes))
    with pytest.raises(SourceMismatchError, match=r"the stream: block .* int16, expected \(10, 10, 10\) uint8"):
        ngff.write_image(root, name="b", source=wrong, geometry=ngff.Geometry((1, 1, 1)), chunks=(10, 10, 10),
                         shards=(10, 10, 10), what="the stream")
    # A store that returns other bytes than were written is caught on read-back, naming the box.
    real_getitem = zarr.Array.__getitem__

    def flipping(self, sel):
        out = real_getitem(self, sel)
        if self.path.endswith("0") and isinstance(out, np.ndarray) and out.size:
            out = out.copy()
            out.flat[-1] ^= 1
        return out

    monkeypatch.setattr(zarr.Array, "__getitem__", flipping)
    with pytest.raises(SourceMismatchError, match=r"conversion of the TIFF does not read back equal at \(slice\(0"):
        ngff.write_image(root, name="b", source=data, geometry=ngff.Geometry((1, 1, 1)), chunks=(10, 10, 10),
                         shards=(10, 10, 10), what="the TIFF", backend="zarr")


def test_label_shape_must_match_the_image(tmp_path):
    root = zarr.open_group(str(tmp_path / "c.zarr"), mode="w", zarr_format=3)
    with pytest.raises(InvalidParameterError, match=r"label 'm' of c has shape \(4, 4, 5\), its image \(4, 4, 4\)"):
        ngff.write_image(root, name="c", source=np.zeros((4, 4, 4), np.uint8), geometry=ngff.Geometry((1, 1, 1)),
                         labels=[ngff.Label("m", np.zeros((4, 4, 5), np.uint8))], what="c")


# ----------------------------------------------------------------------------- strict OME-NGFF 0.5
SCHEMAS = Path(__file__).parent / "fixtures" / "ngff-0.5-schemas"


def _validator(name):
    """A validator of the official 0.5 schema ``name`` (strict_image, label, ...), refs resolved offline."""
    resources = []
    for p in SCHEMAS.glob("*.schema"):
        doc = json.loads(p.read_text())
        resources.append((doc["$id"], Resource.from_contents(doc, default_specification=DRAFT202012)))
    schema = json.loads((SCHEMAS / f"{name}.schema").read_text())
    return jsonschema.Draft202012Validator(schema, registry=Registry().with_resources(resources))


def _assert_valid(name, attrs):
    errors = [f"{list(e.path)}: {e.message}" for e in _validator(name).iter_errors(attrs)]
    assert errors == [], f"{name}: {errors}"


def _write_em(group, name, seed=0, labels=True):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 255, (12, 70, 60), dtype=np.uint8)
    seg = (data // 50).astype(np.uint64)
    mask = (data > 200).astype(np.uint8)
    lab = [ngff.Label("seg", seg), ngff.Label("mito", mask, colors={1: (255, 64, 64, 255)},
                                              properties={0: {"name": "background"}, 1: {"name": "mitochondrion"}},
                                              method="nearest")] if labels else []
    ngff.write_image(group, name=name, source=data, geometry=ngff.Geometry((40.0, 8.0, 8.0), (0.0, 4.0, 4.0)),
                     chunks=(8, 16, 16), shards=(8, 32, 32), labels=lab, what=name)


def test_image_and_labels_pass_the_strict_ngff_05_schemas_and_ome_zarr_models(tmp_path):
    root = zarr.open_group(str(tmp_path / "em.zarr"), mode="w", zarr_format=3)
    _write_em(root, "em")
    g = zarr.open_group(str(tmp_path / "em.zarr"), mode="r")
    for schema in ("image", "strict_image"):
        _assert_valid(schema, g.attrs.asdict())
    for label in ("seg", "mito"):
        attrs = g[f"labels/{label}"].attrs.asdict()
        for schema in ("label", "strict_label", "strict_image"):
            _assert_valid(schema, attrs)
    ms = ngff.multiscales(g)
    assert ms["type"] == "mean" and ms["metadata"]["method"] == "emdata.pyramid.mean"
    assert ms["metadata"]["kwargs"]["factors"][1] == [1, 2, 2]
    seg_label = ngff.ome_attrs(g["labels/seg"])["image-label"]
    assert seg_label["colors"] == [{"label-value": 0, "rgba": [0, 0, 0, 0]}]  # transparent background by default
    mito = ngff.ome_attrs(g["labels/mito"])["image-label"]
    assert mito["properties"] == [{"label-value": 0, "name": "background"}, {"label-value": 1, "name": "mitochondrion"}]
    assert ngff.multiscales(g["labels/mito"])["type"] == "nearest"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ome-zarr-models warns on what it repairs: none of that here
        image = OzmImage.from_zarr(g)
        labels = image.labels
        assert labels is not None and sorted(labels.attributes.ome.labels) == ["mito", "seg"]
        parsed = OzmImageLabel.from_zarr(g["labels/mito"]).attributes.ome.image_label
        assert parsed.colors[0].rgba == (255, 64, 64, 255) and parsed.properties[1].name == "mitochondrion"


def test_a_schema_violation_is_caught_by_the_validators(tmp_path):
    """The checks above can fail: attributes without the strict fields are rejected."""
    root = zarr.open_group(str(tmp_path / "bad.zarr"), mode="w", zarr_format=3)
    _write_em(root, "bad", labels=False)
    attrs = root.attrs.asdict()
    del attrs["ome"]["multiscales"][0]["metadata"]
    _assert_valid("image", attrs)
    with pytest.raises(AssertionError, match="'metadata' is a required property"):
        _assert_valid("strict_image", attrs)
    with pytest.raises(InvalidParameterError, match=r"color of 1 must be four integers 0-255"):
        ngff.write_image(root, name="b", source=np.zeros((4, 4, 4), np.uint8), geometry=ngff.Geometry((1, 1, 1)),
                         labels=[ngff.Label("m", np.zeros((4, 4, 4), np.uint8), colors={1: (300, 0, 0, 255)})],
                         what="b")


def napari_reader(path: str) -> list:
    """napari-ome-zarr's reader, as napari calls it when a user opens ``path`` (no viewer needed)."""
    with warnings.catch_warnings():  # napari's own pydantic v1-style models warn on import; not ours to fix
        warnings.simplefilter("ignore", DeprecationWarning)
        from napari_ome_zarr._reader import napari_get_reader

    reader = napari_get_reader(path)
    assert reader is not None, f"napari-ome-zarr does not claim {path}"
    return reader(path)


def test_collection_of_named_images_for_readers_and_validators(tmp_path):
    path = tmp_path / "epfl.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs["emdata"] = {"source": "test"}
    for i, split in enumerate(("training", "testing")):
        _write_em(root.create_group(split), split, seed=i)
    ngff.write_collection(root, ["training", "testing"])

    g = zarr.open_group(str(path), mode="r")
    assert g.attrs["emdata"] == {"source": "test"}  # provenance kept
    _assert_valid("bf2raw", g.attrs.asdict())
    _assert_valid("ome", g["OME"].attrs.asdict())
    assert g["OME"].attrs["ome"]["series"] == ["training", "testing"]
    assert [name for name, _ in ngff.find_images(g)] == ["training", "testing"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OzmBioFormats2Raw.from_zarr(g)
        for split in ("training", "testing"):
            _assert_valid("strict_image", g[split].attrs.asdict())
            OzmImage.from_zarr(g[split])
    # OME/METADATA.ome.xml: one Image per series, in order, ID "Image:<path>" (what napari-ome-zarr follows).
    xml = ET.parse(path / "OME" / "METADATA.ome.xml").getroot()
    images = [el for el in xml if el.tag.endswith("Image")]
    assert [el.get("ID") for el in images] == ["Image:training", "Image:testing"]
    pixels = images[0][0]
    assert (pixels.get("SizeZ"), pixels.get("SizeY"), pixels.get("SizeX"), pixels.get("Type")) == ("12", "70", "60",
                                                                                                   "uint8")
    assert pixels.get("PhysicalSizeZ") == "40.0" and pixels.get("PhysicalSizeZUnit") == "nm"
    # The images keep their paths: epfl.zarr/training opens as before, in ome-zarr's reader too.
    ms, arrays = ngff.open_multiscale(path / "training")
    assert arrays[0].shape == (12, 70, 60)
    ome_zarr_cli = Path(sys.executable).parent / "ome_zarr"  # the console script, as users run it
    out = subprocess.run([str(ome_zarr_cli), "info", str(path / "testing")], capture_output=True, text=True,
                         check=True).stdout
    assert "(12, 70, 60)" in out and "Multiscales" in out and "mito" in out
    # ... and at the collection's root, as users run it: ome-zarr-py (no bioformats2raw support) finds the first
    # image through the root's named multiscales; napari-ome-zarr's reader opens both images with their labels.
    out = subprocess.run([str(ome_zarr_cli), "info", str(path)], capture_output=True, text=True, check=True).stdout
    assert out.startswith(f"{path} [zgroup]") and "Multiscales" in out and "(12, 70, 60)" in out, out
    assert [m["name"] for m in g.attrs["ome"]["multiscales"]] == ["training", "testing"]
    assert g.attrs["ome"]["multiscales"][1]["datasets"][0]["path"] == "testing/0"
    nodes = list(Reader(parse_url(str(path)))())
    assert np.array_equal(np.asarray(nodes[0].data[0]), g["training/0"][:])
    layers = napari_reader(str(path))
    assert [(kind, meta.get("name")) for _, meta, kind in layers] == [
        ("image", None), ("labels", "labels/training/labels/seg"), ("labels", "labels/training/labels/mito"),
        ("image", None), ("labels", "labels/testing/labels/seg"), ("labels", "labels/testing/labels/mito")]
    assert np.array_equal(np.asarray(layers[3][0][0]), g["testing/0"][:])
    # emdata's readers take the root for a collection: the two images, and open_array asks which one.
    assert [name for name, _ in ngff.find_images(g)] == ["training", "testing"]
    with pytest.raises(InvalidParameterError, match=r"is a collection of OME-Zarr images; pick one with group= "
                                                    r"\(available: \['training', 'testing'\]\)"):
        open_array(path)
    assert open_array(path, group="testing").shape == (12, 70, 60)
    with pytest.raises(InvalidParameterError, match="'validation' is not an OME-Zarr image group"):
        ngff.write_collection(root, ["training", "validation"])


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16", "uint64", "float32"])
def test_exact_sum_is_exact_at_the_extremes_and_on_strided_views(dtype):
    """The figures' ``mean`` comes from ``_exact_sum``: planes summed in a narrow integer must never overflow."""
    rng = np.random.default_rng(3)
    shapes = [(600, 3, 5), (257, 2, 2), (258, 1, 1), (1, 7, 9)]
    for shape in shapes:
        if np.dtype(dtype).kind == "f":
            arrays = [rng.random(shape).astype(dtype)]
        else:
            info = np.iinfo(dtype)
            arrays = [rng.integers(info.min, min(int(info.max), 2**20), shape, endpoint=True).astype(dtype)]
            if info.bits <= 16:  # 64-bit sums are exact below 2**53 only (the docstring's limit)
                arrays += [np.full(shape, info.max, dtype), np.full(shape, info.min, dtype)]
        for a in arrays:
            for view in (a, a[:, ::2, 1:], a[::3]):
                if view.size:
                    want = float(view.astype(np.float64).sum()) if np.dtype(dtype).kind == "f" else \
                        float(sum(int(v) for v in view.ravel()))
                    assert ngff._exact_sum(view) == pytest.approx(want, rel=1e-12 if view.dtype.kind == "f" else 0)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint64, np.float32])
def test_equal_reused_buffer_is_voxel_for_voxel(dtype: type) -> None:
    """``ngff._equal`` (the read-back's compare) finds one differing voxel anywhere, on views of a larger
    array, with its reused buffer going from larger to smaller and back; shape or dtype differences too."""
    rng = np.random.default_rng(3)
    whole = rng.integers(0, 200, (8, 12, 16)).astype(dtype)
    for box in [(slice(0, 8), slice(0, 12), slice(0, 16)), (slice(2, 6), slice(4, 8), slice(8, 16)),
                (slice(0, 8), slice(0, 12), slice(0, 16))]:
        want = whole[box]
        got = want.copy()
        assert ngff._equal(got, want)
        for idx in [(0, 0, 0), tuple(s - 1 for s in got.shape), (got.shape[0] // 2, 1, got.shape[2] - 2)]:
            bad = got.copy()
            bad[idx] += 1
            assert not ngff._equal(bad, want)
    assert not ngff._equal(whole[:2], whole[:3])
    assert ngff._equal(whole.astype(np.int64), whole.astype(np.uint64)) == np.array_equal(
        whole.astype(np.int64), whole.astype(np.uint64))  # other dtypes: np.array_equal itself
    nan = np.array([np.nan], np.float32)
    assert not ngff._equal(nan, nan.copy())  # as np.array_equal: NaN is never equal
