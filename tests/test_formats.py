"""emdata.formats.read_volume: real DM3/DM4/MRC files and synthetic TIFF, MRC and DM files of every kind."""

from __future__ import annotations

import logging
import resource
import time
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile
from ncempy.io import dm

from emdata.errors import SourceMismatchError
from emdata.formats import Volume, VolumeFormatError, VolumeFormatWarning, detect_format, read_volume
from emdata.formats.volume import nm_per_unit
from emdata.offline.replica.dm3_writer import text, write_dm3

FIXTURES = Path(__file__).parent / "fixtures"
DM = FIXTURES / "reference" / "dm3"  # real DM3/DM4 files from ncempy's test data (see realfiles/README.md)
MRC = FIXTURES / "realfiles" / "mrc"


# ------------------------------------------------------------------------------------------ real files
# Expected sizes: the calibrations documented in tests/fixtures/realfiles/README.md (value and unit per axis),
# converted by hand: 4 µm = 4000 nm, 3 nm, 2 pm = 0.002 nm; 2 Å = 0.2 nm, 1 nm.
@pytest.mark.parametrize(("name", "fmt", "shape", "dtype", "voxel_nm", "units"), [
    ("dmTest_3D_int16_64_65_66.dm3", "dm3", (66, 65, 64), np.int16, (4000.0, 3.0, 0.002), ("um", "nm", "pm")),
    ("dmTest_float32_nonSquare_diffPixelSize.dm3", "dm3", (1, 64, 128), np.float32, (None, 0.2, 1.0),
     (None, "A", "nm")),
    ("dmTest_float32_nonSquare_diffPixelSize.dm4", "dm4", (1, 64, 128), np.float32, (None, 0.2, 1.0),
     (None, "A", "nm")),
])
def test_real_dm_files(name, fmt, shape, dtype, voxel_nm, units):
    vol = read_volume(DM / name)
    assert (vol.source_format, vol.shape, vol.dtype) == (fmt, shape, np.dtype(dtype))
    assert vol.voxel_size_nm == voxel_nm and vol.units == units
    assert vol.memory_mapped and isinstance(vol.data, np.memmap)
    # the voxels as an independent reader (ncempy, reading into memory) decodes them
    with dm.fileDM(DM / name, on_memory=True) as f:
        ref = f.getDataset(0)
    np.testing.assert_array_equal(vol.data, np.asarray(ref["data"]).reshape(shape))
    # and the calibration as ncempy reports it (z, y, x), in the units the file spells
    sizes = [float(s) for s in ref["pixelSize"]]
    expected = [s * {"um": 1000, "nm": 1, "pm": 0.001, "A": 0.1}[u] for s, u in zip(sizes, ref["pixelUnit"])]
    got = [v for v in vol.voxel_size_nm if v is not None]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_real_dm3_spectrum_is_refused_naming_file_and_why():
    with pytest.raises(VolumeFormatError, match=r"08_carbon\.dm3: not an image but a spectrum .*'Spectrum'.*EELS"):
        read_volume(DM / "08_carbon.dm3")


def test_real_mrc_without_map_id_is_read_with_a_warning():
    path = MRC / "temp.mrc"
    with pytest.raises(ValueError, match="Map ID"):
        mrcfile.open(path)  # the strict reader refuses it: the header really lacks the map ID
    with pytest.warns(VolumeFormatWarning, match=r"temp\.mrc: MRC header has no map ID"):
        vol = read_volume(path)
    assert (vol.source_format, vol.shape, vol.dtype) == ("mrc", (3, 128, 128), np.float32)
    assert vol.voxel_size_nm == (0.2, 0.2, 0.2)  # 2.0 Å (README; cella 256, 256, 6 Å over 128, 128, 3)
    assert vol.memory_mapped and isinstance(vol.data, np.memmap)
    raw = path.read_bytes()
    cella = np.frombuffer(raw[40:52], "<f4")  # header words 11-13, read here without mrcfile
    grid = np.frombuffer(raw[28:40], "<i4")  # mx, my, mz
    assert list(cella / grid / 10) == [0.2, 0.2, 0.2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(path, permissive=True) as m:
            np.testing.assert_array_equal(vol.data, m.data)


def test_data_is_read_only():
    vol = read_volume(DM / "dmTest_3D_int16_64_65_66.dm3")
    with pytest.raises(ValueError, match="read-only"):
        vol.data[0, 0, 0] = 1


# ------------------------------------------------------------------------------------------ units
@pytest.mark.parametrize(("unit", "nm"), [
    ("pm", 1e-3), ("Å", 0.1), ("\u212b", 0.1), ("A", 0.1), ("angstrom", 0.1), ("nm", 1.0), ("NM", 1.0),
    ("nanometers", 1.0), ("µm", 1e3), ("\u03bcm", 1e3), ("um", 1e3), ("micron", 1e3), ("microns", 1e3),
    ("\\u00B5m", 1e3), ("mm", 1e6), ("cm", 1e7), ("m", 1e9), ("inch", 2.54e7),
])
def test_every_length_unit_spelling(unit, nm):
    assert nm_per_unit(unit) == nm


@pytest.mark.parametrize("unit", ["eV", "1/nm", "s", "a", "Mm", "pixel", ""])
def test_what_is_not_a_length(unit):
    assert nm_per_unit(unit) is None


# ------------------------------------------------------------------------------------------ DM (synthetic)
@pytest.mark.parametrize(("dtype", "size", "unit", "nm"), [
    (np.uint8, 0.00799825, "µm", 7.99825),  # EMPIAR-11759's calibration
    (np.int16, 250.0, "pm", 0.25),
    (np.uint16, 2e-6, "mm", 2.0),
    (np.float32, 3.5, "Å", 0.35),
    (np.int32, 1.5, "nm", 1.5),
    (np.int8, 0.5, "um", 500.0),
    (np.uint32, 1.0, "Å", 0.1),
    (np.float64, 12.5, "pm", 0.0125),
])
def test_dm3_dtypes_and_units(tmp_path, dtype, size, unit, nm):
    image = (np.arange(20 * 30) % 200).astype(dtype).reshape(20, 30)
    path = tmp_path / "x.dm3"
    write_dm3(path, image, pixel_size=(size, size), units=unit)
    vol = read_volume(path)
    assert vol.shape == (1, 20, 30) and vol.dtype == dtype
    assert vol.voxel_size_nm == (None, nm, nm)
    np.testing.assert_array_equal(vol.data[0], image)


def test_dm3_uncalibrated_image_has_no_voxel_size(tmp_path):
    path = tmp_path / "x.dm3"
    write_dm3(path, np.ones((4, 5), np.uint8), pixel_size=(1.0, 1.0), units="")
    assert read_volume(path).voxel_size_nm == (None, None, None)


@pytest.mark.parametrize(("unit", "size", "message"), [
    ("eV", 1.0, r"axis y is calibrated in 'eV'.*not a length"),
    ("1/nm", 0.01, r"axis y is calibrated in '1/nm'"),
    ("nm", 0.0, r"axis y has pixel size 0\.0 nm .*not a positive"),
])
def test_dm3_non_length_calibrations_are_refused(tmp_path, unit, size, message):
    path = tmp_path / "odd.dm3"
    write_dm3(path, np.ones((4, 5), np.uint8), pixel_size=(size, size), units=unit)
    with pytest.raises(VolumeFormatError, match=r"odd\.dm3: " + message):
        read_volume(path)


def test_dm3_tagged_spectrum_and_one_row_data_are_refused(tmp_path):
    path = tmp_path / "s.dm3"
    write_dm3(path, np.ones((3, 5), np.float32), pixel_size=(1.0, 1.0), units="nm",
              image_tags=[("Meta Data", [("Format", text("Spectrum")), ("Signal", text("EELS"))])])
    with pytest.raises(VolumeFormatError, match=r"s\.dm3: not an image but a spectrum"):
        read_volume(path)
    path = tmp_path / "row.dm3"
    write_dm3(path, np.ones((1, 50), np.float32), pixel_size=(1.0, 1.0), units="nm")
    with pytest.raises(VolumeFormatError, match=r"row\.dm3: .*is 1-D"):
        read_volume(path)


def test_dm_time_series_stack_has_no_z_spacing(tmp_path):
    raw = (DM / "dmTest_3D_int16_64_65_66.dm3").read_bytes()
    path = tmp_path / "movie.dm3"
    path.write_bytes(raw.replace("um".encode("utf-16-le"), "ms".encode("utf-16-le")))  # z: 4 µm -> 4 ms
    with dm.fileDM(path, on_memory=False) as f:
        assert f.allTags[".ImageList.2.ImageData.Calibrations.Dimension.3.Units"] == "ms"
    with pytest.warns(VolumeFormatWarning, match=r"movie\.dm3: axis z is calibrated in 'ms': a time series"):
        vol = read_volume(path)
    assert vol.shape == (66, 65, 64) and vol.voxel_size_nm == (None, 3.0, 0.002)


def test_dm_truncated_or_corrupt_fails_naming_the_file(tmp_path):
    raw = (DM / "dmTest_3D_int16_64_65_66.dm3").read_bytes()
    cut = tmp_path / "cut.dm3"
    cut.write_bytes(raw[:400_000])  # ends inside the voxels
    with pytest.raises(VolumeFormatError, match=r"cut\.dm3: truncated: its header announces 703398 bytes, the "
                                                r"file has 400000"):
        read_volume(cut)
    head = tmp_path / "head.dm3"
    head.write_bytes(raw[:3000])  # ends inside the tags
    with pytest.raises(VolumeFormatError, match=r"head\.dm3: truncated"):
        read_volume(head)
    bad = bytearray(raw)
    bad[200:300] = bytes(100)  # zeros among the tags: the file's size is right, its tags are not
    head.write_bytes(bytes(bad))
    with pytest.raises(VolumeFormatError, match=r"head\.dm3: not a readable DM3 file"):
        read_volume(head)


def test_dm_dimensions_that_do_not_match_the_data_size(tmp_path):
    path = tmp_path / "x.dm3"
    write_dm3(path, np.zeros((6, 7), np.uint16), pixel_size=(1.0, 1.0), units="nm")
    raw = bytearray(path.read_bytes())
    at = raw.rfind(b"\x06\x00\x00\x00")  # the image's Dimensions.2 (y = 6), a little-endian uint32
    raw[at:at + 4] = (60_000).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with dm.fileDM(path, on_memory=False) as f:  # the header now says 60000 rows, the data still holds 6
        assert int(f.allTags[".ImageList.2.ImageData.Dimensions.2"]) == 60_000
    with pytest.raises(VolumeFormatError, match=r"x\.dm3: ImageData\.Data holds 84 bytes, its Dimensions "
                                                r"\[7, 60000\] .* need 840000"):
        read_volume(path)


# ------------------------------------------------------------------------------------------ TIFF
def test_tiff_2d_resolution_tags_in_cm_and_mm(tmp_path):
    image = np.arange(12 * 16, dtype=np.uint16).reshape(12, 16)
    path = tmp_path / "cm.tif"
    # 4 nm (x) and 5 nm (y) per pixel, as pixels per centimetre
    tifffile.imwrite(path, image, resolution=(1e7 / 4, 1e7 / 5), resolutionunit="CENTIMETER")
    vol = read_volume(path)
    assert vol.shape == (1, 12, 16) and vol.voxel_size_nm == (None, 5.0, 4.0) and vol.units == (None, "cm", "cm")
    assert vol.memory_mapped
    np.testing.assert_array_equal(vol.data[0], image)
    path = tmp_path / "mm.tif"
    tifffile.imwrite(path, image, resolution=(1e6 / 0.5, 1e6 / 0.5), resolutionunit=4)  # 0.5 nm as px per mm
    assert read_volume(path).voxel_size_nm == (None, 0.5, 0.5)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64,
                                   np.float16, np.float32, np.float64])
def test_tiff_any_integer_or_float_dtype(tmp_path, dtype):
    stack = (np.arange(3 * 4 * 5) % 120).astype(dtype).reshape(3, 4, 5)
    path = tmp_path / "d.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    vol = read_volume(path)
    assert vol.dtype == dtype and vol.shape == (3, 4, 5) and vol.memory_mapped
    np.testing.assert_array_equal(vol.data, stack)


def test_tiff_desktop_dpi_is_not_a_calibration(tmp_path):
    path = tmp_path / "dpi.tif"
    tifffile.imwrite(path, np.zeros((8, 8), np.uint8), resolution=(72, 72), resolutionunit="INCH")
    with pytest.warns(VolumeFormatWarning, match=r"dpi\.tif: resolution 72 x 72 pixels per inch"):
        assert read_volume(path).voxel_size_nm == (None, None, None)
    path = tmp_path / "none.tif"
    tifffile.imwrite(path, np.zeros((8, 8), np.uint8))
    assert read_volume(path).voxel_size_nm == (None, None, None)


@pytest.mark.parametrize(("unit", "spacing", "voxel"), [
    ("nm", 40.0, (40.0, 4.0, 2.0)),
    ("micron", 0.04, (40.0, 4000.0, 2000.0)),
    ("\\u00B5m", 0.05, (50.0, 4000.0, 2000.0)),
    ("mm", 1e-5, (10.0, 4e6, 2e6)),
])
def test_tiff_3d_imagej_units(tmp_path, unit, spacing, voxel):
    stack = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, stack, imagej=True, resolution=(1 / 2, 1 / 4),
                     metadata={"spacing": spacing, "unit": unit, "axes": "ZYX"})
    vol = read_volume(path)
    assert vol.shape == (5, 6, 7) and vol.dtype == np.float32 and vol.memory_mapped
    assert vol.voxel_size_nm == pytest.approx(voxel, rel=1e-12)
    np.testing.assert_array_equal(vol.data, stack)


def test_tiff_imagej_per_axis_units_and_time_series(tmp_path):
    stack = np.zeros((3, 4, 5), np.uint8)
    path = tmp_path / "yunit.tif"
    tifffile.imwrite(path, stack, imagej=True, resolution=(1 / 2, 1 / 3),
                     metadata={"spacing": 0.5, "unit": "nm", "yunit": "pm", "zunit": "\\u00B5m", "axes": "ZYX"})
    assert read_volume(path).voxel_size_nm == (500.0, 0.003, 2.0)
    path = tmp_path / "frames.tif"
    tifffile.imwrite(path, stack, imagej=True, resolution=(1 / 2, 1 / 2), metadata={"unit": "nm", "axes": "TYX"})
    vol = read_volume(path)
    assert vol.shape == (3, 4, 5) and vol.voxel_size_nm == (None, 2.0, 2.0)  # frames: no z spacing


def test_ome_tiff_per_axis_units(tmp_path):
    stack = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    path = tmp_path / "x.ome.tif"
    tifffile.imwrite(path, stack, ome=True, photometric="minisblack",
                     metadata={"axes": "ZYX", "PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "nm",
                               "PhysicalSizeY": 0.002, "PhysicalSizeYUnit": "µm",
                               "PhysicalSizeZ": 400, "PhysicalSizeZUnit": "Å"})
    vol = read_volume(path)
    assert vol.voxel_size_nm == (40.0, 2.0, 0.5) and vol.units == ("Å", "µm", "nm")
    np.testing.assert_array_equal(vol.data, stack)


def test_fei_tiff_pixel_size_in_metres(tmp_path):
    path = tmp_path / "fei.tif"
    ini = "[Scan]\r\nPixelWidth=4.5e-09\r\nPixelHeight=5e-09\r\n"
    tifffile.imwrite(path, np.zeros((8, 9), np.uint16), extratags=[(34682, "s", 0, ini, True)])
    assert read_volume(path).voxel_size_nm == (None, 5.0, 4.5)


def test_compressed_tiff_is_decoded_page_by_page_within_a_bound(tmp_path):
    stack = np.random.default_rng(1).integers(0, 60000, (6, 10, 12)).astype(np.uint16)
    path = tmp_path / "z.tif"
    tifffile.imwrite(path, stack, compression="zlib", photometric="minisblack")
    vol = read_volume(path)
    assert not vol.memory_mapped and vol.shape == (6, 10, 12)
    np.testing.assert_array_equal(vol.data, stack)
    # Past the bound it is never decoded whole: each read decodes only the pages (z) it asks for.
    lazy = read_volume(path, max_decoded_bytes=1000)
    assert not lazy.memory_mapped and not isinstance(lazy.data, np.ndarray)
    assert lazy.shape == (6, 10, 12) and lazy.dtype == np.uint16 and len(lazy.data) == 6
    for key in [(slice(1, 4), slice(2, 9), slice(None, None, 2)), (3,), (slice(None),), (-1, slice(5)),
                (slice(4, 2),)]:
        np.testing.assert_array_equal(lazy.data[key], stack[key])
    np.testing.assert_array_equal(np.stack(list(lazy.data)), stack)
    np.testing.assert_array_equal(np.asarray(lazy.data), stack)
    with pytest.raises(IndexError, match=r"z index 6 out of range"):
        lazy.data[6]
    lazy.data.close()


def test_a_compressed_stack_read_on_demand_holds_only_its_page_cache(tmp_path, monkeypatch):
    """Box by box through a TiffPageStack: at most ``cache_pages`` decoded pages are kept, and a box decodes only
    the pages of its z range."""
    from emdata.formats import tiff as tiff_module

    stack = np.random.default_rng(2).integers(0, 255, (40, 32, 48)).astype(np.uint8)
    path = tmp_path / "lzw.tif"
    tifffile.imwrite(path, stack, compression="zlib", photometric="minisblack")
    decoded: list[int] = []
    real = tifffile.TiffFile.asarray

    def counting(self, *args, **kwargs):
        decoded.append(kwargs.get("key"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffFile, "asarray", counting)
    data = tiff_module.TiffPageStack(path, (40, 32, 48), np.dtype(np.uint8), cache_bytes=10 * 32 * 48)
    assert data.cache_pages == 10
    np.testing.assert_array_equal(data[8:16, :16, :16], stack[8:16, :16, :16])
    np.testing.assert_array_equal(data[8:16, 16:, 16:], stack[8:16, 16:, 16:])  # the same pages: from the cache
    assert sorted(decoded) == list(range(8, 16))
    np.testing.assert_array_equal(data[20:40], stack[20:40])
    assert len(data._cache) == 10 and sorted(data._cache) == list(range(30, 40))
    data.close()


def test_uncompressed_multipage_tiff_is_memory_mapped(tmp_path):
    stack = np.arange(7 * 8 * 9, dtype=">u2").reshape(7, 8, 9)  # big-endian file
    path = tmp_path / "mp.tif"
    tifffile.imwrite(path, stack, photometric="minisblack", byteorder=">")
    vol = read_volume(path)
    assert vol.memory_mapped and isinstance(vol.data, np.memmap) and vol.shape == (7, 8, 9)
    np.testing.assert_array_equal(vol.data, stack)


@pytest.mark.parametrize(("array", "kwargs", "message"), [
    (np.zeros((8, 9, 3), np.uint8), {"photometric": "rgb"}, r"3 samples per pixel \(RGB\?\)"),
    (np.zeros((2, 3, 8, 9), np.uint8), {"imagej": True, "metadata": {"axes": "ZCYX"}}, r"3 channels"),
    (np.zeros((2, 3, 8, 9), np.uint8), {"imagej": True, "metadata": {"axes": "TZYX"}}, r"more than a 3-D stack"),
    (np.zeros((8, 9), np.complex64), {}, r"complex"),
    (np.zeros((1, 50), np.uint8), {}, r"is 1-D"),
])
def test_tiff_that_is_not_a_grey_level_image_or_stack_is_refused(tmp_path, array, kwargs, message):
    path = tmp_path / "bad.tif"
    tifffile.imwrite(path, array, **kwargs)
    with pytest.raises(VolumeFormatError, match=r"bad\.tif: .*" + message):
        read_volume(path)


def test_truncated_tiff_fails_naming_the_file(tmp_path):
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, np.ones((40, 50), np.uint16))
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(VolumeFormatError, match=r"t\.tif: "):
        read_volume(path)
    path.write_bytes(b"II*\x00" + bytes(4))
    with pytest.raises(VolumeFormatError, match=r"t\.tif: holds no image"):
        read_volume(path)


# ------------------------------------------------------------------------------------------ MRC
def _write_mrc(path: Path, data: np.ndarray, voxel_a: float | tuple[float, float, float], *,
               stack: bool = False) -> None:
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
        if stack:
            m.set_image_stack()
        elif data.ndim == 3:
            m.set_volume()
        m.voxel_size = voxel_a


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16, np.float32, np.float16])
def test_mrc_volume_dtypes_voxel_size_in_angstrom(tmp_path, dtype):
    data = (np.arange(3 * 4 * 5) % 100).astype(dtype).reshape(3, 4, 5)
    path = tmp_path / "v.mrc"
    _write_mrc(path, data, (1.5, 2.5, 35.0))  # x, y, z in Å
    vol = read_volume(path)
    assert vol.source_format == "mrc" and vol.dtype == dtype and vol.shape == (3, 4, 5)
    assert vol.voxel_size_nm == (3.5, 0.25, 0.15) and vol.units == ("Å", "Å", "Å")
    assert vol.memory_mapped
    np.testing.assert_array_equal(vol.data, data)


def test_mrc_image_and_image_stack(tmp_path):
    path = tmp_path / "img.mrc"
    _write_mrc(path, np.ones((4, 5), np.float32), 10.0)
    vol = read_volume(path)
    assert vol.shape == (1, 4, 5) and vol.voxel_size_nm == (None, 1.0, 1.0)  # one image: no z spacing
    path = tmp_path / "stack.mrcs"
    _write_mrc(path, np.ones((6, 4, 5), np.float32), 10.0, stack=True)
    vol = read_volume(path)
    assert vol.shape == (6, 4, 5) and vol.voxel_size_nm == (None, 1.0, 1.0)  # mz = 1: no z spacing
    path = tmp_path / "uncal.mrc"
    with mrcfile.new(path) as m:
        m.set_data(np.ones((2, 4, 5), np.int16))  # cella stays 0: no calibration
    assert read_volume(path).voxel_size_nm == (None, None, None)


def test_mrc_without_map_id_is_read_permissively_with_a_warning(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    path = tmp_path / "noid.map"
    _write_mrc(path, data, 5.0)
    raw = bytearray(path.read_bytes())
    assert raw[208:212] == b"MAP "
    raw[208:212] = bytes(4)
    path.write_bytes(bytes(raw))
    assert detect_format(path) == "mrc"
    with pytest.warns(VolumeFormatWarning, match=r"noid\.map: MRC header has no map ID"):
        vol = read_volume(path)
    assert vol.voxel_size_nm == (0.5, 0.5, 0.5)
    np.testing.assert_array_equal(vol.data, data)


def test_mrc_axis_order_from_mapc_mapr_maps(tmp_path):
    stored = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # sections, rows, columns
    path = tmp_path / "swap.mrc"
    with mrcfile.new(path) as m:
        m.set_data(stored)
        m.set_volume()
        m.header.mapc, m.header.mapr = 2, 1  # columns run along y, rows along x
        m.header.cella = (30.0, 80.0, 20.0)  # Å along x, y, z
        m.header.mx, m.header.my, m.header.mz = 3, 4, 2
    vol = read_volume(path)
    assert vol.shape == (2, 4, 3)
    np.testing.assert_array_equal(vol.data, stored.transpose(0, 2, 1))
    assert vol.voxel_size_nm == (1.0, 2.0, 1.0)


def test_mrc_refuses_complex_volume_stacks_and_bad_headers(tmp_path):
    path = tmp_path / "c.mrc"
    with mrcfile.new(path) as m:
        m.set_data(np.zeros((4, 5), np.complex64))
    with pytest.raises(VolumeFormatError, match=r"c\.mrc: voxels are complex64 .*MRC mode 4"):
        read_volume(path)
    path = tmp_path / "vs.mrc"
    with mrcfile.new(path) as m:
        m.set_data(np.zeros((2, 3, 4, 5), np.float32))
    with pytest.raises(VolumeFormatError, match=r"vs\.mrc: MRC space group 401 .*4-D"):
        read_volume(path)
    path = tmp_path / "big.mrc"
    _write_mrc(path, np.zeros((2, 3, 4), np.int8), 1.0)
    raw = bytearray(path.read_bytes())
    raw[0:4] = np.int32(-7).tobytes()  # nx
    path.write_bytes(bytes(raw))
    with pytest.raises(VolumeFormatError, match=r"big\.mrc: MRC header field nx, ny, nz = \[-7, 3, 2\]"):
        read_volume(path)


def test_truncated_mrc_fails_before_mapping(tmp_path):
    path = tmp_path / "t.mrc"
    _write_mrc(path, np.zeros((10, 20, 30), np.float32), 1.0)
    path.write_bytes(path.read_bytes()[:1024 + 5000])
    with pytest.raises(VolumeFormatError, match=r"t\.mrc: nx \* ny \* nz after the header and nsymbt: 24000 bytes "
                                                r"of voxels at offset 1024 run past the end of the file \(6024"):
        read_volume(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(VolumeFormatError, match=r"t\.mrc: 300 bytes, shorter than an MRC header"):
        read_volume(path)


# ------------------------------------------------------------------------------------------ large files
def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@pytest.mark.parametrize("fmt", ["tiff", "mrc"])
def test_a_4_gib_file_is_mapped_not_read(tmp_path, fmt):
    """Sparse 4 GiB files: opening them must cost neither the time nor the memory of reading them."""
    shape = (512, 2048, 2048)
    path = tmp_path / f"big.{fmt}"
    if fmt == "tiff":
        m = tifffile.memmap(path, shape=shape, dtype=np.uint16, photometric="minisblack")
        m[300, 5, 7] = 42
        m.flush()
        del m
    else:
        with mrcfile.new_mmap(path, shape=shape, mrc_mode=6) as mrc:
            mrc.data[300, 5, 7] = 42
            mrc.voxel_size = 8.0
    assert path.stat().st_size > 4 << 30
    before = _peak_rss_mib()
    began = time.perf_counter()
    vol = read_volume(path)
    took = time.perf_counter() - began
    assert vol.memory_mapped and vol.shape == shape and int(vol.data[300, 5, 7]) == 42
    assert took < 2.0, f"{took:.2f} s to open a 4 GiB {fmt}"
    assert _peak_rss_mib() - before < 64


# ------------------------------------------------------------------------------------------ detection
def test_format_is_recognised_by_content_not_name(tmp_path, caplog):
    path = tmp_path / "slice_0001.dm3"
    image = np.arange(30, dtype=np.uint8).reshape(5, 6)
    tifffile.imwrite(path, image)
    assert detect_format(path) == "tiff"
    with caplog.at_level(logging.WARNING, logger="emdata.formats.read"):
        vol = read_volume(path)
    assert vol.source_format == "tiff" and "named like dm3 but its content is tiff" in caplog.text
    np.testing.assert_array_equal(vol.data[0], image)
    renamed = tmp_path / "image.bin"
    renamed.write_bytes((DM / "dmTest_float32_nonSquare_diffPixelSize.dm4").read_bytes())
    assert detect_format(renamed) == "dm4" and read_volume(renamed).voxel_size_nm == (None, 0.2, 1.0)


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n" + bytes(2000), bytes(2000), b"hello"])
def test_unknown_formats_are_refused(tmp_path, content):
    path = tmp_path / "mystery.mrc"
    path.write_bytes(content)
    with pytest.raises(VolumeFormatError, match=r"mystery\.mrc: unknown format .*not DM3, DM4, TIFF or MRC"):
        read_volume(path)


def test_errors_are_source_mismatches_and_value_errors():
    assert issubclass(VolumeFormatError, SourceMismatchError) and issubclass(VolumeFormatError, ValueError)
    with pytest.raises(VolumeFormatError, match="cannot be read"):
        read_volume(FIXTURES / "no-such-file.tif")


def test_volume_checks_its_axes():
    with pytest.raises(ValueError, match=r"must be \(z, y, x\)"):
        Volume(np.zeros((2, 2)), (None, None, None), "tiff", Path("x"), False, (None, None, None), "")


# ------------------------------------------------------------------------------------------ mapped pages
def _mapped_rss_kb(path: Path) -> int:
    """Resident kB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's first line
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_paged_array_reads_a_mapped_volume_box_by_box_without_keeping_its_pages(tmp_path):
    """Read whole through PagedArray: same voxels as the map, but about one box of the file stays resident,
    where reading the plain map keeps every page (the growth bench/bench_memory.py measured as RssFile)."""
    from emdata.formats.volume import PagedArray, file_mapping, release_pages

    data = np.random.default_rng(7).integers(0, 255, size=(64, 256, 512), dtype=np.uint8)  # 8 MiB
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    plain = read_volume(path)
    assert plain.memory_mapped and file_mapping(plain.data) is not None
    assert not release_pages(np.zeros(4))  # not a map: nothing to drop
    boxes = [(slice(z, z + 16), slice(None), slice(x, x + 128)) for z in range(0, 64, 16) for x in range(0, 512, 128)]
    for box in boxes:
        np.asarray(plain.data[box]).sum()
    whole_kb = _mapped_rss_kb(path)
    assert whole_kb >= data.nbytes // 1024 * 0.9  # every page of the map is resident
    paged_volume = read_volume(path)
    paged = PagedArray(paged_volume.data)
    assert paged.shape == data.shape and paged.dtype == data.dtype
    release_pages(plain.data)
    for box in boxes:
        got = paged[box]
        assert not isinstance(got, np.memmap) and np.array_equal(got, data[box])
    assert _mapped_rss_kb(path) <= 16 * 256 * 512 // 1024 + 64  # at most the last z-slab's pages
    assert np.array_equal(paged_volume.data, data)  # the dropped pages read back from the file unchanged
