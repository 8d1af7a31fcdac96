"""Checks against the real sources (deselected by default; run with ``pytest -m network``)."""

from __future__ import annotations

import pytest
import requests

from emdata.acquire.download import USER_AGENT
from emdata.sources.epfl import BASE_URL

pytestmark = pytest.mark.network


def test_epfl_live_folder_serves_tiff_with_ranges():
    r = requests.get(BASE_URL + "training.tif", headers={"Range": "bytes=0-7", "User-Agent": USER_AGENT},
                     timeout=30)
    assert r.status_code == 206
    assert r.content[:4] in (b"II*\x00", b"MM\x00*")
    assert r.headers["Content-Range"].startswith("bytes 0-7/")
