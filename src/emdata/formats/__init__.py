"""Format parsers: image volumes (DM3/DM4, TIFF, MRC: :func:`read_volume`) and Neuroglancer ``info`` documents."""

from emdata.formats.read import detect_format, read_volume
from emdata.formats.volume import Volume, VolumeFormatError, VolumeFormatWarning

__all__ = ["Volume", "VolumeFormatError", "VolumeFormatWarning", "detect_format", "read_volume"]
