"""DM3: ncempy and the slice reader (emdata.formats.read_volume) on real files, and the replica's DM3 writer."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from ncempy.io import dm

from emdata.errors import SourceMismatchError
from emdata.offline.replica.dm3_writer import encode_dm3, write_dm3
from emdata.sources.empiar import read_slice

REAL = Path(__file__).parent / "fixtures" / "reference" / "dm3"  # real files from ncempy's test data


@pytest.mark.parametrize(("name", "shape", "dtype", "sizes", "units"), [
    ("dmTest_3D_int16_64_65_66.dm3", (66, 65, 64), np.int16, [4.0, 3.0, 2.0], ["um", "nm", "pm"]),
    ("dmTest_float32_nonSquare_diffPixelSize.dm3", (64, 128), np.float32, [2.0, 1.0], ["A", "nm"]),
    ("08_carbon.dm3", (1, 2048), np.float32, [1.0, 0.1], ["", "eV"]),
])
def test_ncempy_reads_real_dm3_files(name, shape, dtype, sizes, units):
    with dm.fileDM(REAL / name, on_memory=False) as f:
        assert f.thumbnail
        dataset = f.getDataset(0)
    assert dataset["data"].shape == shape and dataset["data"].dtype == dtype
    np.testing.assert_allclose([float(s) for s in dataset["pixelSize"]], sizes, rtol=1e-6)
    assert list(dataset["pixelUnit"]) == units


@pytest.mark.parametrize(("name", "message"), [
    ("08_carbon.dm3", r"08_carbon.dm3: not a readable image \(.*08_carbon.dm3: .*(spectrum|eV)"),
    ("dmTest_3D_int16_64_65_66.dm3", r"expected one 2-D image, got 66 sections of \(65, 64\) \(a stack\)"),
])
def test_slice_reader_refuses_a_spectrum_and_a_stack_where_one_image_is_expected(name, message):
    with pytest.raises(SourceMismatchError, match=message):
        read_slice(REAL / name)


def test_slice_reader_takes_every_section_of_a_stack_with_per_axis_units():
    """The real 3-D int16 file is calibrated in µm (z), nm (y) and pm (x): each axis converted on its own."""
    s = read_slice(REAL / "dmTest_3D_int16_64_65_66.dm3", stack=True)
    assert s.data.shape == (66, 65, 64) and s.data.dtype == np.int16 and s.sections == 66
    assert s.z_nm == 4000.0 and s.pixel_size_nm == (3.0, 0.002) and s.units == ("um", "nm", "pm")
    with dm.fileDM(REAL / "dmTest_3D_int16_64_65_66.dm3", on_memory=False) as f:
        np.testing.assert_array_equal(s.data, f.getDataset(0)["data"])


@pytest.mark.parametrize("name", ["dmTest_float32_nonSquare_diffPixelSize.dm3",
                                  "dmTest_float32_nonSquare_diffPixelSize.dm4"])
def test_slice_reader_takes_float32_dm3_and_dm4_with_angstrom_and_nm(name):
    """Formerly refused (2-D uint8 only): a float32 image, y in Å and x in nm, read from DM3 and DM4 alike."""
    s = read_slice(REAL / name)
    assert s.data.shape == (1, 64, 128) and s.data.dtype == np.float32 and s.source_format == name[-3:]
    assert s.pixel_size_nm == (0.2, 1.0) and s.z_nm is None and s.units[1:] == ("A", "nm")
    with dm.fileDM(REAL / name, on_memory=False) as f:
        np.testing.assert_array_equal(s.data[0], f.getDataset(0)["data"])


def test_slice_reader_refuses_bytes_that_are_no_image(tmp_path):
    tiff = tmp_path / "fake.dm3"
    tiff.write_bytes(b"II*\x00" + bytes(64))
    with pytest.raises(SourceMismatchError, match="fake.dm3: not a readable image"):
        read_slice(tiff)
    text = tmp_path / "notes.dm3"
    text.write_bytes(b"<html>not found</html>" * 4)
    with pytest.raises(SourceMismatchError, match=r"notes.dm3: not a readable image .*unknown format"):
        read_slice(text)


@pytest.mark.parametrize(("units", "pixel_size", "nm"), [
    ("µm", (0.00799825, 0.00799825), (7.99825, 7.99825)), ("pm", (8000.0, 4000.0), (8.0, 4.0)),
    (("Å", "mm"), (80.0, 8e-6), (8.0, 8.0)), ("nm", (2.5, 2.5), (2.5, 2.5)),
])
def test_writer_units_per_axis_read_back_in_nm(tmp_path, units, pixel_size, nm):
    path = tmp_path / "u.dm3"
    write_dm3(path, np.zeros((4, 6), np.float32), pixel_size=pixel_size, units=units)
    assert read_slice(path).pixel_size_nm == nm


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.float32, np.int32])
@pytest.mark.parametrize("shape", [(96, 128), (5, 3), (1, 7)])
def test_writer_round_trips_through_ncempy(tmp_path, dtype, shape):
    rng = np.random.default_rng(7)
    image = (rng.random(shape) * 200).astype(dtype)
    path = tmp_path / "x.dm3"
    write_dm3(path, image, pixel_size=(0.5, 0.25), units="nm", name="round trip")
    with dm.fileDM(path, on_memory=False) as f:
        assert f.thumbnail and f.numObjects == 2
        dataset = f.getDataset(0)
        thumb = f.getThumbnail()
        memmap = np.asarray(f.getMemmap(0)).reshape(shape)
    np.testing.assert_array_equal(dataset["data"].reshape(shape), image)
    np.testing.assert_array_equal(memmap, image)
    assert dataset["data"].dtype == dtype
    assert [float(s) for s in dataset["pixelSize"]] == [0.5, 0.25]
    assert list(dataset["pixelUnit"]) == ["nm", "nm"]
    assert thumb.shape[:2] == shape and thumb.shape[2] == 4


def test_writer_layout_and_micrometre_calibration(tmp_path):
    image = np.arange(96 * 128, dtype=np.uint32).reshape(96, 128).astype(np.uint8)
    data = encode_dm3(image, pixel_size=(0.00799825, 0.00799825), units="µm", name="3VBSED_slice_0000")
    version, root_length, byte_order = struct.unpack(">III", data[:12])
    assert (version, root_length, byte_order) == (3, len(data) - 16, 1)  # as GMS writes (checked on real files)
    assert data[-8:] == bytes(8)
    assert "µ".encode("utf-16-le") in data  # units as UTF-16 code units
    path = tmp_path / "s.dm3"
    path.write_bytes(data)
    with dm.fileDM(path, on_memory=False) as f:
        assert f.dataType == [23, 6]  # RGBA thumbnail, then uint8 (DataType 6)
        assert f.allTags[".ImageList.2.Name"] == "3VBSED_slice_0000"
    s = read_slice(path)
    assert s.pixel_size_nm == (7.99825, 7.99825) and s.data.shape == (1, 96, 128)
    np.testing.assert_array_equal(s.data[0], image)


def test_writer_matches_the_real_file_layout_as_ncempy_sees_it(tmp_path):
    """Same tag paths for the image calibration and data as in ncempy's real test file."""
    path = tmp_path / "x.dm3"
    write_dm3(path, np.zeros((64, 128), np.float32), pixel_size=(2.0, 1.0), units="nm")
    with dm.fileDM(path, on_memory=False) as f:
        ours = {k for k in f.allTags if k.startswith(".ImageList.2.ImageData.")}
    with dm.fileDM(REAL / "dmTest_float32_nonSquare_diffPixelSize.dm3", on_memory=False) as f:
        real = {k for k in f.allTags if k.startswith(".ImageList.2.ImageData.")}
    assert ours == real


def test_writer_refuses_what_dm3_cannot_hold():
    with pytest.raises(ValueError, match=r"2-D image .*\(2, 3, 4\)"):
        encode_dm3(np.zeros((2, 3, 4), np.uint8), pixel_size=(1.0, 1.0))
    with pytest.raises(ValueError, match="no DataType for bool"):
        encode_dm3(np.zeros((2, 3), bool), pixel_size=(1.0, 1.0))
