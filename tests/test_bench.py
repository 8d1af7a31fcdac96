"""Smoke tests of the benchmarks: the download benchmark's quick run, and the figures the summaries rest on."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_download_quick_runs_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "download.json"
    proc = subprocess.run([sys.executable, "bench/bench_download.py", "--quick", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    from emdata.acquire.params import DownloadConfig

    assert result["defaults"]["workers"] == DownloadConfig().workers
    for set_name in ("large", "many"):
        cases = result["sets"][set_name]["cases"]
        default = [n for n in cases if n.startswith("defaults (")]
        assert len(default) == 1, cases
        best = result["sets"][set_name]["best"]
        assert cases[best]["ratio"] == 1.0
        assert all(c["ratio"] > 0 and c["median_s"] > 0 for c in cases.values())
    assert "defaults, first download (unpinned: fetched twice)" in result["sets"]["large"]["cases"]
    assert "| case | seconds | MB/s | x best |" in proc.stdout


def test_dvc_model_recovers_costs_per_file_and_per_byte() -> None:
    bench_dvc = load("bench_dvc")
    fixed, per_file, per_mb, tar_per_mb, mb = 2.0, 0.004, 0.01, 0.005, 100.0
    layouts = {}
    for files in (600, 80, 12):
        ratios = {"dvc pull, nothing to do": {"median_s": fixed},
                  "dvc pull (default jobs, copy)": {"median_s": fixed + per_file * files + per_mb * mb},
                  "one GET + untar": {"median_s": tar_per_mb * mb}}
        layouts[files] = {"files": files, "bytes": mb * 1e6, "ratios": ratios}
    m = bench_dvc.model({"layouts": layouts}, "dvc pull (default jobs, copy)")
    assert m["per_file_ms"] == pytest.approx(4.0)
    assert m["per_mb_ms"] == pytest.approx(10.0)
    p = m["projections"]["2021 files, 2.07 GB"]
    assert p["dvc_s"] == pytest.approx(2.0 + 0.004 * 2021 + 0.01 * 2070)
    assert p["ratio"] == pytest.approx(p["dvc_s"] / (0.005 * 2070))


def test_bench_all_rejects_an_unknown_benchmark() -> None:
    proc = subprocess.run([sys.executable, "bench/bench_all.py", "--only", "nonesuch"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "nonesuch" in proc.stderr
