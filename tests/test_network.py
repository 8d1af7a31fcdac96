"""The live check against the real sources (deselected by default; ``pytest -m network`` or ``make live-check``).

Needs the internet: every live host gets a few small requests (documents, one range of each file, one chunk
of each chunked volume), compared with what the small replica serves. Any difference, unreadable answer or
host that is down fails the test with the table's details.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emdata.offline import livecheck

pytestmark = pytest.mark.network


def test_the_live_sources_agree_with_the_replica(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "live-check.json"
    status = livecheck.main(["--replica-profile", "small", "--json", str(out)])
    table = capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert {r["source"] for r in rows} == set(livecheck.SOURCES), table
    notable = [r for r in rows if r["verdict"] not in (livecheck.AGREE, livecheck.SAME_CONTENT, livecheck.OWN)]
    assert status == 0 and not notable, table
