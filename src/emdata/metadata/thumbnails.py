"""Thumbnails: orthogonal mid-slices (xy, xz, yz) at physical aspect, with a scale bar in nm and labels overlaid."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from PIL import Image, ImageDraw, ImageFont

from emdata.ngff import multiscales

# plane -> (fixed axis, (row axis, column axis)), axes indexed z=0, y=1, x=2; rows run down, columns across.
PLANES: dict[str, tuple[int, tuple[int, int]]] = {"xy": (0, (1, 2)), "xz": (1, (0, 2)), "yz": (2, (0, 1))}
AXIS_NAMES = "zyx"
FOOTER_PX = 22  # the band under the image holding the scale bar and the slice's position
MIN_WIDTH_PX = 220  # narrower images are padded on the right so the footer stays legible
LABEL_FILL_ALPHA = 0.25  # opacity of a label's inside over the EM (a dense segmentation must not hide it)
LABEL_EDGE_ALPHA = 0.9  # opacity of the one-pixel outline of each labelled region
# A slice whose grey values vary less than this (standard deviation after the contrast window, 0..255) shows
# nothing (a blank or missing section): the nearest slice that does, at most MAX_SHIFT slices away, is shown
# instead (and the caption says so).
FLAT_STD = 2.0
MAX_SHIFT = 16
# Scale bar lengths tried, in nm (1, 2, 5 per decade), the longest that fits in a quarter of the width wins.
NICE_STEPS = (1, 2, 5)


@dataclass(frozen=True)
class Thumbnail:
    plane: str
    path: Path
    image_px: tuple[int, int]  # (height, width) of the picture above the footer
    extent_nm: tuple[float, float]  # physical (height, width) it shows
    level: int  # pyramid level the slice was read from
    index: int  # slice index along the fixed axis at that level
    scale_bar_nm: float
    labels: bool  # the image's labels are overlaid


@dataclass(frozen=True)
class _Level:
    array: zarr.Array
    scale: tuple[float, ...]
    translation: tuple[float, ...]


def _levels(group: zarr.Group) -> list[_Level]:
    ms = multiscales(group)
    levels = []
    for d in ms["datasets"]:
        t = {x["type"]: x for x in d["coordinateTransformations"]}
        scale = tuple(float(v) for v in t["scale"]["scale"])
        translation = tuple(float(v) for v in t.get("translation", {"translation": [0.0] * 3})["translation"])
        array = group[d["path"]]
        assert isinstance(array, zarr.Array)
        levels.append(_Level(array, scale, translation))
    return levels


def output_size(extent_nm: tuple[float, float], longest_px: int) -> tuple[int, int]:
    """(height, width) in pixels of a picture of ``extent_nm`` at physical aspect, longest side ``longest_px``."""
    px_per_nm = longest_px / max(extent_nm)
    return max(1, round(extent_nm[0] * px_per_nm)), max(1, round(extent_nm[1] * px_per_nm))


def _pick_level(levels: Sequence[_Level], axes: tuple[int, int], size: tuple[int, int]) -> int:
    """The coarsest level still at least ``size`` along ``axes`` (never upsampled from a coarse level)."""
    best = 0
    for i, level in enumerate(levels):
        if all(level.array.shape[a] >= s for a, s in zip(axes, size, strict=True)):
            best = i
    return best


def _read_slice(level: _Level, fixed: int, index: int) -> np.ndarray:
    sl: list[Any] = [slice(None)] * 3
    sl[fixed] = index
    return np.asarray(level.array[tuple(sl)])


def _mid_index(levels: Sequence[_Level], plane: str, size: tuple[int, int]) -> tuple[int, int]:
    """(level, index) of the slice through level 0's physical centre, at the level picked for ``size``."""
    fixed, axes = PLANES[plane]
    base = levels[0]
    centre_nm = base.translation[fixed] + (base.array.shape[fixed] - 1) / 2 * base.scale[fixed]
    li = _pick_level(levels, axes, size)
    level = levels[li]
    n = level.array.shape[fixed]
    return li, min(n - 1, max(0, round((centre_nm - level.translation[fixed]) / level.scale[fixed])))


def _shown_slice(levels: Sequence[_Level], plane: str, size: tuple[int, int],
                 window: tuple[float, float] | None) -> tuple[np.ndarray, int, int, int]:
    """The mid-slice, or the nearest one with contrast if it is blank: (windowed 2-D uint8, level, index, mid)."""
    fixed, _ = PLANES[plane]
    li, mid = _mid_index(levels, plane, size)
    level = levels[li]
    n = level.array.shape[fixed]
    first = _window(_read_slice(level, fixed, mid), window)
    if float(first.std()) >= FLAT_STD:
        return first, li, mid, mid
    for shift in range(1, MAX_SHIFT + 1):
        for index in (mid - shift, mid + shift):
            if 0 <= index < n:
                grey = _window(_read_slice(level, fixed, index), window)
                if float(grey.std()) >= FLAT_STD:
                    return grey, li, index, mid
    return first, li, mid, mid


def _label_slice(levels: Sequence[_Level], plane: str, size: tuple[int, int], image_level: _Level,
                 image_index: int) -> np.ndarray:
    """The label slice at the physical position of the image slice shown."""
    fixed, _ = PLANES[plane]
    position_nm = image_level.translation[fixed] + image_index * image_level.scale[fixed]
    li, _ = _mid_index(levels, plane, size)
    level = levels[li]
    n = level.array.shape[fixed]
    index = min(n - 1, max(0, round((position_nm - level.translation[fixed]) / level.scale[fixed])))
    return _read_slice(level, fixed, index)


def _window(data: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    lo, hi = window if window is not None and window[1] > window[0] else (float(data.min()), float(data.max()))
    scaled = (data.astype(np.float32) - lo) / max(hi - lo, 1e-12)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _palette(values: np.ndarray, colors: Mapping[int, tuple[int, int, int, int]]) -> np.ndarray:
    """RGBA (0..1) per label value: NGFF ``colors`` where given, else a fixed golden-ratio hue per value."""
    out = np.zeros((len(values), 4), dtype=np.float32)
    for i, v in enumerate(values.tolist()):
        if v in colors:
            out[i] = np.array(colors[v], dtype=np.float32) / 255.0
            continue
        hue = (int(v) * 0.6180339887) % 1.0
        out[i, :3] = _hsv_to_rgb(hue, 0.85, 1.0)
        out[i, 3] = 1.0
    return out


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def _overlay(rgb: np.ndarray, labels: np.ndarray, colors: Mapping[int, tuple[int, int, int, int]]) -> np.ndarray:
    """Each labelled region tinted in its colour, its outline drawn (0 is unlabelled)."""
    values, inverse = np.unique(labels, return_inverse=True)
    rgba = _palette(values, colors)
    rgba[values == 0] = 0.0
    per_pixel = rgba[inverse.reshape(labels.shape)]
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    alpha = per_pixel[..., 3:4] * np.where(edge, LABEL_EDGE_ALPHA, LABEL_FILL_ALPHA)[..., None]
    return rgb * (1 - alpha) + per_pixel[..., :3] * 255.0 * alpha


def scale_bar_nm(width_nm: float) -> float:
    """The longest 1/2/5 x 10^k nm bar no longer than a quarter of ``width_nm``."""
    target = width_nm / 4
    exponent = math.floor(math.log10(target)) if target > 0 else 0
    best = 10.0**exponent
    for step in NICE_STEPS:
        if step * 10.0**exponent <= target:
            best = step * 10.0**exponent
    return best


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _render(grey: np.ndarray, overlays: Sequence[tuple[np.ndarray, Mapping[int, tuple[int, int, int, int]]]],
            extent_nm: tuple[float, float], caption: str) -> tuple[Image.Image, float]:
    """The picture with its footer: greyscale (a third of the bytes) without overlays, RGB with them."""
    h, w = grey.shape
    width = max(w, MIN_WIDTH_PX)
    if overlays:
        rgb = np.repeat(grey[..., None].astype(np.float32), 3, axis=2)
        for labels, colors in overlays:
            rgb = _overlay(rgb, labels, colors)
        canvas = Image.new("RGB", (width, h + FOOTER_PX), (0, 0, 0))
        canvas.paste(Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), "RGB"), (0, 0))
        white: Any = (255, 255, 255)
        light: Any = (200, 200, 200)
    else:
        canvas = Image.new("L", (width, h + FOOTER_PX), 0)
        canvas.paste(Image.fromarray(grey, "L"), (0, 0))
        white, light = 255, 200
    draw = ImageDraw.Draw(canvas)
    bar_nm = scale_bar_nm(extent_nm[1])
    bar_px = max(1, round(bar_nm * w / extent_nm[1]))
    y = h + FOOTER_PX // 2
    draw.rectangle((6, y - 2, 6 + bar_px - 1, y + 1), fill=white)
    font = _font(12)
    draw.text((12 + bar_px, y), f"{bar_nm:g} nm", fill=white, font=font, anchor="lm")
    draw.text((width - 6, y), caption, fill=light, font=font, anchor="rm")
    return canvas, bar_nm


def write_thumbnails(image: zarr.Group, labels: Sequence[tuple[zarr.Group, Mapping[int, tuple[int, int, int, int]]]],
                     window: tuple[float, float] | None, longest_px: int, folder: Path,
                     stem: str) -> list[Thumbnail]:
    """Write ``folder/<stem>.<plane>.png`` for xy, xz and yz, and with ``labels`` also ``<stem>.<plane>.labels.png``
    (the same slice with the labels overlaid); ``window`` maps grey values to black..white."""
    levels = _levels(image)
    label_levels = [(_levels(g), colors) for g, colors in labels]
    base = levels[0]
    thumbs = []
    for plane, (fixed, axes) in PLANES.items():
        extent = (base.array.shape[axes[0]] * base.scale[axes[0]], base.array.shape[axes[1]] * base.scale[axes[1]])
        size = output_size(extent, longest_px)
        shown, li, index, mid = _shown_slice(levels, plane, size, window)
        grey = np.asarray(Image.fromarray(shown, "L").resize((size[1], size[0]), Image.Resampling.LANCZOS))
        overlays = []
        for llevels, colors in label_levels:
            ldata = _label_slice(llevels, plane, size, levels[li], index)
            # Nearest keeps label values whole; resize through an index image so any integer type works.
            values, inverse = np.unique(ldata, return_inverse=True)
            idx = Image.fromarray(inverse.reshape(ldata.shape).astype(np.int32), "I").resize(
                (size[1], size[0]), Image.Resampling.NEAREST)
            overlays.append((values[np.asarray(idx)], colors))
        caption = f"{plane}, {AXIS_NAMES[fixed]} {index + 1}/{levels[li].array.shape[fixed]}, level {li}"
        if index != mid:
            caption += " (mid blank)"
        for with_labels in ([False, True] if overlays else [False]):
            canvas, bar = _render(grey, overlays if with_labels else [], extent, caption)
            path = folder / f"{stem}.{plane}{'.labels' if with_labels else ''}.png"
            canvas.save(path, optimize=True)
            thumbs.append(Thumbnail(plane, path, size, extent, li, index, bar, with_labels))
    return thumbs
