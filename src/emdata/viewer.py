"""Serve one output OME-Zarr with Neuroglancer's web client on loopback, fully offline (``emdata view``)."""

from __future__ import annotations

import logging
import math
import secrets
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from emdata.errors import InvalidParameterError
from emdata.ngff import find_images, label_names, multiscales, ome_attrs

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_UNIT_TO_NM = {"nanometer": 1.0, "micrometer": 1000.0, "angstrom": 0.1}
# The intensity window comes from the coarsest level; beyond this many voxels it is read with a stride.
_MAX_RANGE_VOXELS = 1 << 22
# Neuroglancer's default cross-section scale is one voxel per screen pixel; zoom so ~500 px (a panel of the
# 4-panel layout) hold the image's x-y extent.
_FIT_PIXELS = 500


@dataclass(frozen=True)
class LabelLayer:
    name: str
    path: str  # group path inside the output
    colors: dict[int, str] = field(default_factory=dict)  # label value -> "#rrggbb" (from NGFF image-label colors)


@dataclass(frozen=True)
class ImageLayer:
    """One OME-Zarr image of an output (its root, or a child group such as EPFL's ``training``)."""

    name: str  # "" for the output's root image
    path: str  # group path inside the output ("" for the root)
    shape: tuple[int, int, int]
    dtype: str
    voxel_size_nm: tuple[float, float, float]
    translation_nm: tuple[float, float, float]
    intensity_range: tuple[float, float]
    labels: tuple[LabelLayer, ...]


def _level0_geometry(group: zarr.Group) -> tuple[zarr.Array, tuple[float, ...], tuple[float, ...]]:
    ms = multiscales(group)
    axes = [a["name"] for a in ms["axes"]]
    if axes != ["z", "y", "x"]:
        raise InvalidParameterError(f"image {group.path or '/'!r} has axes {axes}; emdata view needs z, y, x")
    factors = []
    for axis in ms["axes"]:
        unit = axis.get("unit")
        if unit not in _UNIT_TO_NM:
            raise InvalidParameterError(f"image {group.path or '/'!r}: unsupported axis unit {unit!r}")
        factors.append(_UNIT_TO_NM[unit])
    level0 = ms["datasets"][0]
    transforms = {t["type"]: t for t in level0["coordinateTransformations"]}
    scale = tuple(float(s) * f for s, f in zip(transforms["scale"]["scale"], factors, strict=True))
    translation = tuple(float(t) * f for t, f in zip(
        transforms.get("translation", {"translation": [0.0, 0.0, 0.0]})["translation"], factors, strict=True))
    array = group[level0["path"]]
    assert isinstance(array, zarr.Array)
    return array, scale, translation


def _intensity_range(group: zarr.Group) -> tuple[float, float]:
    """0.5 and 99.5 percentiles of the coarsest level: a display window that works for int16 EM too."""
    ms = multiscales(group)
    array = group[ms["datasets"][-1]["path"]]
    assert isinstance(array, zarr.Array)
    n = math.prod(array.shape)
    step = max(1, math.ceil((n / _MAX_RANGE_VOXELS) ** (1 / 3)))
    data = np.asarray(array[::step, ::step, ::step])
    if data.size == 0:
        return (0.0, 1.0)
    lo, hi = (float(v) for v in np.percentile(data, [0.5, 99.5]))
    if hi <= lo:
        hi = lo + 1.0
    return (lo, hi)


def _label_colors(group: zarr.Group) -> dict[int, str]:
    colors: dict[int, str] = {}
    for entry in ome_attrs(group).get("image-label", {}).get("colors", []) or []:
        try:
            value = int(entry["label-value"])
            r, g, b = (int(c) for c in entry["rgba"][:3])
        except (KeyError, TypeError, ValueError):
            continue
        colors[value] = f"#{r:02x}{g:02x}{b:02x}"
    return colors


def describe(output: Path, groups: Sequence[str] | None = None) -> list[ImageLayer]:
    """The images of an output (all of them, or those named in ``groups``) with their labels and geometry."""
    root = zarr.open_group(str(output), mode="r")
    images = find_images(root)
    if not images:
        raise InvalidParameterError(f"{output} holds no OME-Zarr multiscale image (at its root or one level down)")
    available = [name or "." for name, _ in images]
    if groups:
        wanted = [g.strip("/") or "." for g in groups]
        unknown = [g for g in wanted if g not in available]
        if unknown:
            raise InvalidParameterError(f"{output} has no image group {unknown[0]!r}; its images: {available}")
        images = [(name, group) for name, group in images if (name or ".") in wanted]
    layers = []
    for name, group in images:
        array, scale, translation = _level0_geometry(group)
        labels = []
        for label in label_names(group):
            lgroup = group[f"labels/{label}"]
            assert isinstance(lgroup, zarr.Group)
            labels.append(LabelLayer(label, f"{name}/labels/{label}".lstrip("/"), _label_colors(lgroup)))
        layers.append(ImageLayer(
            name=name, path=name, shape=tuple(int(s) for s in array.shape),  # type: ignore[arg-type]
            dtype=str(array.dtype), voxel_size_nm=scale, translation_nm=translation,  # type: ignore[arg-type]
            intensity_range=_intensity_range(group), labels=tuple(labels),
        ))
    return layers


def viewer_state(dataset: str, images: Sequence[ImageLayer], data_url: str, layout: str = "4panel") -> dict[str, Any]:
    """A Neuroglancer state (JSON): every image as an image layer, its labels as segmentation layers.

    ``data_url`` is where the output's root is served. Neuroglancer reads each layer's voxel size and
    translation from the OME-Zarr ``multiscales`` itself; the global dimensions are the first image's voxel
    size (x, y, z, in nm) and the view starts at its centre. Only the first image is visible (EPFL's splits
    overlap in space); the others are one click away.
    """
    if not images:
        raise InvalidParameterError("no image to show")
    first = images[0]
    vz, vy, vx = first.voxel_size_nm
    # Centre of the first image in global coordinates (units of its voxel size): Neuroglancer maps voxel
    # index i (covering [i, i + 1)) through the OME scale and translation.
    centre = [t / v + s / 2 for t, v, s in zip(first.translation_nm, first.voxel_size_nm, first.shape,
                                               strict=True)]
    extent = max(first.shape[2] * vx, first.shape[1] * vy)
    layers: list[dict[str, Any]] = []
    base = data_url.rstrip("/")
    for i, image in enumerate(images):
        title = f"{dataset}/{image.name}" if image.name else dataset
        source = f"zarr3://{base}/{image.path}/" if image.path else f"zarr3://{base}/"
        layers.append({
            "type": "image", "name": title, "source": source, "visible": i == 0,
            "shaderControls": {"normalized": {"range": list(image.intensity_range)}},
        })
        for label in image.labels:
            layer: dict[str, Any] = {
                "type": "segmentation", "name": f"{title} {label.name}", "source": f"zarr3://{base}/{label.path}/",
                "visible": i == 0, "selectedAlpha": 0.35,
            }
            if label.colors:
                layer["segmentColors"] = {str(k): v for k, v in label.colors.items() if k != 0}
                # Show the labelled classes, not just the hovered segment (a mask has few ids).
                layer["segments"] = [str(k) for k in label.colors if k != 0]
            layers.append(layer)
    return {
        "dimensions": {"x": [vx * 1e-9, "m"], "y": [vy * 1e-9, "m"], "z": [vz * 1e-9, "m"]},
        "position": [centre[2], centre[1], centre[0]],
        "crossSectionScale": extent / min(vx, vy) / _FIT_PIXELS,
        "projectionScale": extent * 1.5 / min(vx, vy),
        "layers": layers,
        "selectedLayer": {"layer": layers[0]["name"], "visible": False},
        "layout": layout,
    }


RequestLog = Callable[[str, str, int, str | None], None]  # method, path, status, Range header


def _print_request(method: str, path: str, status: int, byte_range: str | None) -> None:
    print(f"{method} {path} {status}" + (f" {byte_range}" if byte_range else ""), file=sys.stderr, flush=True)


class ViewerServer:
    """Neuroglancer's Python-integration server on loopback, plus the output's files under ``/data/<token>/``.

    The client is the one the pinned ``neuroglancer`` package ships (its static files); the output's files
    are served by tornado's ``StaticFileHandler`` (Range requests, HEAD, confined to the output folder) on
    the same origin, so the client needs no CORS and nothing leaves the machine.
    """

    def __init__(self, dataset: str, output: Path, images: Sequence[ImageLayer], *, port: int = 0,
                 layout: str = "4panel", request_log: RequestLog | None = None) -> None:
        import neuroglancer
        import neuroglancer.server
        import tornado.web

        log_request = request_log

        class DataHandler(tornado.web.StaticFileHandler):
            def on_finish(self) -> None:
                if log_request is not None:
                    log_request(self.request.method or "", self.request.path, self.get_status(),
                                self.request.headers.get("Range"))

        output = output.resolve()
        token = secrets.token_hex(8)
        prefix = f"/data/{token}/{output.name}"
        neuroglancer.set_server_bind_address(LOOPBACK, port)
        self._viewer = neuroglancer.Viewer()  # starts the server (once per process)
        server = neuroglancer.server.global_server
        if server is None:
            raise RuntimeError("the Neuroglancer server did not start")
        # A per-viewer token in the path: a second viewer in the same process never serves the wrong folder.
        server.app.add_handlers(r".*", [(rf"{prefix}/(.*)", DataHandler, {"path": str(output)})])
        self.images = tuple(images)
        self.base_url: str = server.server_url
        self.data_url = f"{self.base_url}{prefix}"
        self.state = viewer_state(dataset, images, self.data_url, layout)
        self._viewer.set_state(neuroglancer.ViewerState(self.state))
        self.url: str = self._viewer.get_viewer_url()

    @property
    def viewer(self) -> Any:
        """The ``neuroglancer.Viewer`` (e.g. ``.screenshot()`` once a browser shows it)."""
        return self._viewer

    def stop(self) -> None:
        import neuroglancer

        neuroglancer.stop()

    def __enter__(self) -> ViewerServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(dataset: str, output: Path, *, groups: Sequence[str] | None = None, port: int = 0,
          layout: str = "4panel", log_requests: bool = False) -> ViewerServer:
    """Start serving ``output`` (its images, or those in ``groups``) and return the running server."""
    images = describe(output, groups)
    return ViewerServer(dataset, output, images, port=port, layout=layout,
                        request_log=_print_request if log_requests else None)
