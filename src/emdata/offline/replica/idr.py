"""Replica of IDR image 9846137: the ImageJ TIFF on ftp.ebi.ac.uk and its two OMERO JSON documents.

The TIFF is written as ImageJ 1.52p wrote the real one (uncompressed, one strip per page, contiguous,
``ImageDescription`` "ImageJ=1.52p ... unit=\\u00B5m spacing=0.02", X/YResolution 50 px/µm, ResolutionUnit none;
see the tag dump ``idr_9846137_xy_tif_tags.json`` in the project's reference notes). No verbatim OMERO response for this image
is known: the JSON API ``/api/v0/m/images/9846137/`` follows the OMERO documentation sample (with
``"data": {...}`` as real servers answer), and ``/webclient/imgData/9846137/`` has the field set of omero-web's
``imageMarshal`` with the values a third party recorded from the live document; both agree with the generated
TIFF. A URL ending in ``/`` is served from ``index.html`` in that folder. The OMERO host's outages are the
server's ``outage_hosts`` behaviour (503 on the JSON; the TIFF on ftp.ebi.ac.uk stays up).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from emdata.offline.replica.synth import em_like

VERSION = 2
IMAGE_ID = 9846137
DATASET_ID = 10740
FILE_NAME = "Figure_S3B_FIB-SEM_U2OS_20x20x20nm_xy.tif"
TIFF_PATH = ("ftp.ebi.ac.uk/pub/databases/IDR/idr0086-miron-micrographs/20200610-ftp/experimentD/Miron_FIB-SEM/"
             f"Miron_FIB-SEM_processed/{FILE_NAME}")
API_PATH = f"idr.openmicroscopy.org/api/v0/m/images/{IMAGE_ID}/index.html"
IMGDATA_PATH = f"idr.openmicroscopy.org/webclient/imgData/{IMAGE_ID}/index.html"
# (z, y, x): the real shape in "full" (152.5 MB, builds in seconds); "small" keeps a similar aspect for tests.
SHAPES = {"full": (184, 775, 1121), "small": (24, 96, 140), "half": (184, 775, 560), "double": (184, 775, 2242),
          "quad": (184, 775, 4484)}
EXTRA_PROFILES = ("half", "double", "quad")  # bench/bench_memory.py's sizes: x halved, doubled, four times
VOXEL_UM = 0.02  # 20 nm isotropic, as ImageJ stores it (spacing in µm; resolution 50 pixels per µm)
SEED = 9846137
SLAB = 32  # z-planes generated at once (bounded memory in "full")


def volume(shape: tuple[int, int, int]) -> np.ndarray:
    """Deterministic FIB-SEM-like U2OS cell: EM texture with one large, darker, granular nucleus."""
    out = np.empty(shape, dtype=np.uint8)
    zz, yy, xx = np.ogrid[0:shape[0], 0:shape[1], 0:shape[2]]
    centre = [s * f for s, f in zip(shape, (0.5, 0.45, 0.55), strict=True)]
    radii = [s * f for s, f in zip(shape, (0.45, 0.35, 0.3), strict=True)]
    for z0 in range(0, shape[0], SLAB):
        n = min(SLAB, shape[0] - z0)
        em = em_like((n, shape[1], shape[2]), seed=SEED, origin=(z0, 0, 0)).em.astype(np.float32)
        r2 = (((zz[z0:z0 + n] - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2
              + ((xx - centre[2]) / radii[2]) ** 2)
        nucleus = r2 < 1.0
        # Heterochromatin: darker and denser towards the nuclear envelope.
        em = np.where(nucleus, em * 0.55 + 30.0 * np.clip(1.5 - r2, 0.0, 1.0) + 20.0, em)
        out[z0:z0 + n] = np.clip(em, 0, 255).astype(np.uint8)
    return out


def imagej_description(data: np.ndarray, spacing_um: float) -> str:
    """The ImageDescription ImageJ 1.52p writes for a z-stack (µm written as the escape ImageJ uses)."""
    return (f"ImageJ=1.52p\nimages={data.shape[0]}\nslices={data.shape[0]}\nunit=\\u00B5m\n"
            f"spacing={spacing_um:g}\nloop=false\nmin={float(data.min()):.1f}\nmax={float(data.max()):.1f}")


def write_imagej_tiff(path: Path, data: np.ndarray, voxel_um: float = VOXEL_UM) -> None:
    """Uncompressed, contiguous, one strip per page, resolution in pixels per µm (ResolutionUnit none)."""
    per_um = round(1.0 / voxel_um, 6)
    tifffile.imwrite(path, data, description=imagej_description(data, voxel_um), metadata=None,
                     resolution=(per_um, per_um), resolutionunit=1, photometric="minisblack", software=False,
                     subfiletype=0, rowsperstrip=data.shape[1], compression=None)


def _length(value_um: float) -> dict[str, Any]:
    return {"Symbol": "µm", "Value": value_um, "@type": "TBD#LengthI", "Unit": "MICROMETER"}


def api_image_document(shape: tuple[int, int, int], voxel_um: float = VOXEL_UM) -> dict[str, Any]:
    """``GET /api/v0/m/images/<id>/`` in the shape of the OMERO JSON API docs (single image: ``data`` object)."""
    z, y, x = shape
    return {"data": {
        "@id": IMAGE_ID,
        "Name": FILE_NAME,
        "AcquisitionDate": None,
        "omero:details": {"@type": "TBD#Details", "permissions": {"perm": "r-r---", "canAnnotate": False,
                                                                   "canEdit": False, "canLink": False,
                                                                   "canDelete": False}},
        "Pixels": {
            "@id": IMAGE_ID,
            "Channels": [{"omero:photometricInterpretation": {"@id": 5, "@type": "TBD#PhotometricInterpretation",
                                                              "value": "Monochrome"},
                          "SamplesPerPixel": 1, "omero:LogicalChannelId": IMAGE_ID, "@id": IMAGE_ID,
                          "@type": "http://www.openmicroscopy.org/Schemas/OME/2016-06#Channel"}],
            "SizeX": x, "SizeY": y, "SizeZ": z, "SizeC": 1, "SizeT": 1,
            "PhysicalSizeX": _length(voxel_um),
            "PhysicalSizeY": _length(voxel_um),
            "PhysicalSizeZ": _length(voxel_um),
            "Type": {"@id": 1, "@type": "TBD#PixelsType", "value": "uint8"},
            "@type": "http://www.openmicroscopy.org/Schemas/OME/2016-06#Pixels",
            "SignificantBits": 8,
        },
        "omero:series": 0,
        "@type": "http://www.openmicroscopy.org/Schemas/OME/2016-06#Image",
    }}


def imgdata_document(data: np.ndarray, voxel_um: float = VOXEL_UM) -> dict[str, Any]:
    """``GET /webclient/imgData/<id>/``: the keys, key order and nesting of omero-web's ``imageMarshal``.

    Fields and order from ``omeroweb/webgateway/marshal.py`` (ome/omero-web @ 0304697): ``id``, ``meta``,
    ``perms``, ``interpolate``, ``size``, ``pixel_size`` (µm), then, with a rendering definition, ``pixel_range``,
    ``channels`` (``rdefMarshal``), ``split_channel``, ``rdefs``, then ``tiles`` and ``init_zoom``; no
    ``nominalMagnification`` (the image has no objective settings). Values from a third party's record of the
    live document (projectName ``idr0086-miron-micrographs/experimentD``, pixel size 0.02 µm on x, y, z) and IDR's
    curation files (dataset ``U2OS_chromatin``); ids, timestamp, author and rendering values are the replica's.
    """
    z, y, x = data.shape
    lo, hi = float(data.min()), float(data.max())
    return {
        "id": IMAGE_ID,
        "meta": {"imageName": FILE_NAME, "imageDescription": "", "imageAuthor": "Public data",
                 "projectName": "idr0086-miron-micrographs/experimentD", "projectId": 1151,
                 "projectDescription": "", "datasetName": "U2OS_chromatin", "datasetId": DATASET_ID,
                 "datasetDescription": "", "wellSampleId": "", "wellId": "", "imageTimestamp": 1591747200.0,
                 "imageId": IMAGE_ID, "pixelsType": "uint8"},
        "perms": {"canAnnotate": False, "canEdit": False, "canDelete": False, "canLink": False},
        "interpolate": True,
        "size": {"width": x, "height": y, "z": z, "t": 1, "c": 1},
        "pixel_size": {"x": voxel_um, "y": voxel_um, "z": voxel_um},
        "pixel_range": [0, 255],
        "channels": [{"emissionWave": None, "label": "0", "color": "808080", "inverted": False,
                      "reverseIntensity": False, "family": "linear", "coefficient": 1.0, "active": True,
                      "window": {"min": lo, "max": hi, "start": lo, "end": hi}}],
        "split_channel": {"g": {"width": x + 4, "height": y + 4, "border": 2, "gridx": 1, "gridy": 1},
                          "c": {"width": x + 4, "height": y + 4, "border": 2, "gridx": 1, "gridy": 1}},
        "rdefs": {"model": "greyscale", "projection": "normal", "defaultZ": z // 2, "defaultT": 0,
                  "invertAxis": False},
        "tiles": False,
        "init_zoom": 0,
    }


def write_json(path: Path, document: dict[str, Any]) -> None:
    """As Django's ``JsonResponse`` sends it (``json.dumps`` defaults: ASCII escapes, ", " and ": ")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document), encoding="ascii")


def build(root: Path, profile: str) -> None:
    shape = SHAPES[profile]
    data = volume(shape)
    tiff = root / TIFF_PATH
    tiff.parent.mkdir(parents=True, exist_ok=True)
    write_imagej_tiff(tiff, data)
    write_json(root / API_PATH, api_image_document(shape))
    write_json(root / IMGDATA_PATH, imgdata_document(data))
