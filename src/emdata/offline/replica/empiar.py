"""Replica of EMPIAR-11759: the REST API entry, the autoindex of ``data/`` (every style), 16 DM3 slices, the XML.gz."""

# "full" has the real slice shape (5500, 5496): the EM-like texture is generated at half resolution in y, x
# (generating 16 full-resolution slices takes minutes) and repeated 2x2, plus full-resolution noise. It serves the
# API document verbatim (so its known 5628 x 5632 size disagreement with the files shows as in the live run).
# "small" (tests) has 16 slices of (96, 128) and serves a copy of the API document whose ``image_width`` /
# ``image_height`` are "128" / "96", matching the small slices; every other field is verbatim.
# Each folder holds ``index.apache-table.html`` (EBI's HTTPS autoindex, the server's default), ``index.pre.html``
# and ``index.nginx.html``; the server's ``autoindex`` behaviour picks one. The server sends the ``.xml.gz`` with
# ``Content-Encoding: gzip`` by default (``gz_as_encoding_hosts``), as EBI's Apache does.
# The data folder has one sub-folder (SOURCES.md: "one sub-folder; 18 entries"): its name is not recorded anywhere
# we could read, so the replica uses a placeholder name (the stage lists sub-folders but fetches nothing there).

from __future__ import annotations

import gzip
import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from emdata.offline.replica.dm3_writer import write_dm3
from emdata.offline.replica.server import AUTOINDEX_STYLES
from emdata.offline.replica.synth import em_like

VERSION = 2  # 2: autoindex in every style (Apache table by default), no index.html
API_PATH = "www.ebi.ac.uk/empiar/api/entry/11759"
DATA_PATH = "ftp.ebi.ac.uk/empiar/world_availability/11759/data"
SLICE_NAME = "F57-8_test1_3VBSED_slice_{:04d}.dm3"
XML_NAME = "F57-8_test1.xml.gz"
SUBFOLDER = "subfolder_name_unknown"
N_SLICES = 16
SHAPES = {"full": (5500, 5496), "small": (96, 128), "half": (5500, 2748)}  # (y, x) of one slice
EXTRA_PROFILES = ("half",)  # bench/bench_memory.py's second size: x halved, API size matching the files
PIXEL_SIZE_UM = 0.00799825  # the DM3 calibration of the live slices (stored as float32, in µm)
SEED = 11759
# The API response, verbatim (reference copy: sources/empiar_11759_api.json, see its README for provenance).
API_DOCUMENT = r"""{
  "EMPIAR-11759": {
    "authors": [
      {
        "author": {
          "author_orcid": null,
          "name": "Wilsch-Br\u00e4uninger M"
        }
      }
    ],
    "biostudies_references": [],
    "citation": [
      {
        "authors": [
          {
            "author_orcid": null,
            "name": "Wilsch-Br\u00e4uninger M"
          }
        ],
        "book_chapter_title": null,
        "country": "",
        "details": null,
        "doi": null,
        "editors": [],
        "first_page": null,
        "issue": null,
        "j_or_nj_citation": false,
        "journal": null,
        "journal_abbreviation": null,
        "language": null,
        "last_page": null,
        "preprint": null,
        "publication_location": "",
        "published": false,
        "publisher": "",
        "pubmedid": null,
        "title": "Developing retina in zebrafish 55 hpf larval eye.",
        "volume": null,
        "year": null
      }
    ],
    "corresponding_author": {
      "author": {
        "author_orcid": null,
        "country": "Germany",
        "first_name": "Michaela",
        "last_name": "Wilsch-Br\u00e4uninger",
        "middle_name": null,
        "organization": "Max Planck Institute of Molecular Cell Biology and Genetics",
        "post_or_zip": "01307",
        "state_or_province": null,
        "street": null,
        "town_or_city": "Dresden"
      }
    },
    "cross_references": [],
    "dataset_size": "1.2 GB",
    "deposition_date": "2023-11-01",
    "empiar_references": [],
    "entry_doi": "10.6019/EMPIAR-11759",
    "experiment_type": "SBF-SEM",
    "grant_references": [],
    "idr_references": [],
    "imagesets": [
      {
        "category": "reconstructed volumes",
        "data_format": "DM3",
        "details": "Developing retina in zebrafish 55 hpf larval eye. \nIt is a SBF-SEM data set. \nThe resolution is 8nm/px in xy and 50nm per section (z). \n\nIf this is also where to enter, the acquisition conditions on the FEI Magellan400 SEM were 1.9kV accelerating voltage and 200pA current at 0.5 usec dwell time. \nThe microtome unit of the SBF-SEM is called Gatan 3ViewXP.",
        "directory": "data",
        "frame_range_max": null,
        "frame_range_min": null,
        "frames_per_image": 1,
        "header_format": "DM3",
        "image_height": "5632",
        "image_width": "5628",
        "micrographs_file_pattern": "",
        "name": "Developing retina in zebrafish 55 hpf larval eye.",
        "num_images_or_tilt_series": 16,
        "picked_particles_directory": "",
        "picked_particles_file_pattern": "",
        "pixel_height": 80.0,
        "pixel_width": 80.0,
        "segmentations": [],
        "voxel_type": "UNSIGNED BYTE"
      }
    ],
    "obsolete_date": null,
    "principal_investigator": [
      {
        "author_orcid": null,
        "country": "Germany",
        "email": "wilsch [at] mpi-cbg.de",
        "entry": "EMPIAR-11759",
        "fax": null,
        "first_name": "Michaela",
        "last_name": "Wilsch-Br\u00e4uninger",
        "middle_name": null,
        "organization": "Max Planck Institute of Molecular Cell Biology and Genetics",
        "post_or_zip": "01307",
        "state_or_province": null,
        "street": null,
        "telephone": null,
        "town_or_city": "Dresden"
      }
    ],
    "release_date": "2024-01-15",
    "scale": "tissue",
    "status": "REL",
    "title": "Developing retina in zebrafish 55 hpf larval eye.",
    "update_date": "2024-01-15",
    "version_history": [],
    "workflow_file": null
  }
}
"""


def api_document(profile: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(API_DOCUMENT)
    if profile != "full":
        imageset = doc["EMPIAR-11759"]["imagesets"][0]
        height, width = SHAPES[profile]
        imageset["image_width"], imageset["image_height"] = str(width), str(height)
    return doc


def slices(profile: str) -> list[np.ndarray]:
    """The 16 synthetic slices (y, x) uint8, deterministic."""
    height, width = SHAPES[profile]
    if profile == "small":
        return list(em_like((N_SLICES, height, width), seed=SEED).em)
    out: list[np.ndarray] = []
    half = (-(-height // 2), -(-width // 2))
    for z0 in range(0, N_SLICES, 8):  # 8-slice slabs: ~4.2 GB peak, ~25 s on 2 cores (measured)
        slab = em_like((8, *half), seed=SEED, origin=(z0, 0, 0)).em
        for z, plane in enumerate(slab):
            rng = np.random.default_rng([SEED, z0 + z])
            up = np.repeat(np.repeat(plane, 2, axis=0), 2, axis=1)[:height, :width].astype(np.int16)
            up += rng.integers(-6, 7, size=up.shape, dtype=np.int16)
            out.append(np.clip(up, 0, 255).astype(np.uint8))
    return out


DATE = (2023, 11, 1, 10, 0)  # listing dates: a placeholder (the deposition date), no live listing was saved
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _apache_size(size: int | None) -> str:
    """Apache's human-readable size column ("  - ", "5.0K", " 29M", "1.2G")."""
    if size is None:
        return "  - "
    value, unit = float(size), ""
    for unit in ("", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            break
        value /= 1024
    if not unit:
        return f"{size:>4d}"[-4:] if size < 10000 else f"{size}"
    return f"{value:.1f}{unit}" if value < 10 else f"{value:3.0f}{unit}"


def autoindex_html(path: str, entries: list[tuple[str, int | None]], style: str = "apache-table") -> str:
    """The autoindex page of folder ``path`` (URL path, no trailing slash) for ``entries`` (name, size; None =
    folder) in one of the server's styles: Apache ``mod_autoindex`` HTMLTable (EBI's, modelled on the fixture
    in shared/reference/sources), Apache FancyIndexing ``<pre>``, or nginx."""
    year, month, day, hour, minute = DATE
    iso = f"{year:04d}-{month:02d}-{day:02d} {hour:02d}:{minute:02d}"
    parent = html.escape(path.rsplit("/", 1)[0] + "/")
    title = f"Index of {html.escape(path)}"
    items = [(name + "/" if size is None else name, size) for name, size in entries]
    if style == "apache-table":
        lines = [
            '<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 3.2 Final//EN">', "<html>", f" <head><title>{title}</title></head>",
            " <body>", f"<h1>{title}</h1>", "  <table>",
            '   <tr><th valign="top"><img src="/icons/blank.gif" alt="[ICO]"></th><th><a href="?C=N;O=D">Name</a>'
            '</th><th><a href="?C=M;O=A">Last modified</a></th><th><a href="?C=S;O=A">Size</a></th><th>'
            '<a href="?C=D;O=A">Description</a></th></tr>',
            '   <tr><th colspan="5"><hr></th></tr>',
            f'<tr><td valign="top"><img src="/icons/back.gif" alt="[PARENTDIR]"></td><td><a href="{parent}">Parent '
            'Directory</a></td><td>&nbsp;</td><td align="right">  - </td><td>&nbsp;</td></tr>',
        ]
        for href, size in items:
            icon, alt = ("folder.gif", "[DIR]") if size is None else ("unknown.gif", "[   ]")
            h = html.escape(href)
            lines.append(f'<tr><td valign="top"><img src="/icons/{icon}" alt="{alt}"></td><td><a href="{h}">{h}</a>'
                         f'</td><td align="right">{iso}  </td><td align="right">{_apache_size(size)}</td>'
                         "<td>&nbsp;</td></tr>")
        lines += ['   <tr><th colspan="5"><hr></th></tr>', "</table>", "</body></html>", ""]
    elif style == "pre":
        lines = [
            '<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 3.2 Final//EN">', "<html>", " <head>",
            f"  <title>{title}</title>", " </head>", " <body>", f"<h1>{title}</h1>",
            '<pre><img src="/icons/blank.gif" alt="Icon "> <a href="?C=N;O=D">Name</a>'
            '                                <a href="?C=M;O=A">Last modified</a>      <a href="?C=S;O=A">Size</a>'
            '  <a href="?C=D;O=A">Description</a><hr><img src="/icons/back.gif" alt="[PARENTDIR]"> '
            f'<a href="{parent}">Parent Directory</a>                                         -   ',
        ]
        for href, size in items:
            icon, alt = ("folder.gif", "[DIR]") if size is None else ("unknown.gif", "[   ]")
            lines.append(f'<img src="/icons/{icon}" alt="{alt}"> <a href="{html.escape(href)}">{html.escape(href)}'
                         f'</a>{" " * max(1, 36 - len(href))}{iso}  {_apache_size(size)}  ')
        lines += ["<hr></pre>", "</body></html>", ""]
    elif style == "nginx":
        stamp = f"{day:02d}-{_MONTHS[month - 1]}-{year:04d} {hour:02d}:{minute:02d}"
        lines = ["<html>", f"<head><title>{title}/</title></head>", "<body>",
                 f'<h1>{title}/</h1><hr><pre><a href="../">../</a>']
        for href, size in items:
            shown = href if len(href) <= 50 else href[:47] + "..&gt;"  # nginx cuts long names in the text only
            lines.append(f'<a href="{html.escape(href)}">{shown}</a>{" " * max(1, 51 - len(href))}{stamp}'
                         f"{'-' if size is None else size:>20}")
        lines += ["</pre><hr></body>", "</html>", ""]
    else:
        raise ValueError(f"autoindex style must be one of {AUTOINDEX_STYLES}, got {style!r}")
    return "\n".join(lines)


def write_indexes(folder: Path, url_path: str, entries: list[tuple[str, int | None]] | None = None) -> None:
    """Write ``index.<style>.html`` of every style into ``folder`` (the server serves the one its behaviour
    asks for). ``entries`` defaults to the folder's own content (files with their sizes, then sub-folders)."""
    if entries is None:
        entries = listing_entries(folder)
    for style in AUTOINDEX_STYLES:
        (folder / f"index.{style}.html").write_text(autoindex_html(url_path, entries, style), encoding="utf-8")


def listing_entries(folder: Path) -> list[tuple[str, int | None]]:
    """The folder's entries as an autoindex lists them: files (name, size) and sub-folders (name, None), by name."""
    out: list[tuple[str, int | None]] = []
    for p in sorted(folder.iterdir()):
        if p.is_dir():
            out.append((p.name, None))
        elif not p.name.startswith("index."):
            out.append((p.name, p.stat().st_size))
    return out


def stack_xml(profile: str) -> bytes:
    """A small stand-in for ``F57-8_test1.xml.gz`` (the live file's content is unknown): the slice list."""
    height, width = SHAPES[profile]
    items = "".join(f'  <slice index="{i}" file="{SLICE_NAME.format(i)}"/>\n' for i in range(N_SLICES))
    xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<!-- emdata replica stand-in, not the live content -->\n'
           f'<stack name="F57-8_test1" width="{width}" height="{height}" pixel_size_um="{PIXEL_SIZE_UM}">\n'
           f"{items}</stack>\n")
    return gzip.compress(xml.encode(), mtime=0)


def build(root: Path, profile: str) -> None:
    api = root / API_PATH
    api.mkdir(parents=True, exist_ok=True)
    body = API_DOCUMENT if profile == "full" else json.dumps(api_document(profile), indent=2) + "\n"
    (api / "index.html").write_text(body, encoding="utf-8")

    data = root / DATA_PATH
    (data / SUBFOLDER).mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(slices(profile)):
        write_dm3(data / SLICE_NAME.format(i), image, pixel_size=(PIXEL_SIZE_UM, PIXEL_SIZE_UM), units="µm",
                  name=f"3VBSED_slice_{i:04d}")
    (data / XML_NAME).write_bytes(stack_xml(profile))
    write_indexes(data / SUBFOLDER, url_path(f"{DATA_PATH}/{SUBFOLDER}"))
    write_indexes(data, url_path(DATA_PATH))


def url_path(tree_path: str) -> str:
    """The URL path of a replica folder ``HOST/PATH`` (what the autoindex page titles and links use)."""
    return "/" + tree_path.split("/", 1)[1]
