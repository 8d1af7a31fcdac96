"""examples/blocks.ipynb runs top to bottom (nbclient) on the EPFL output built from the small replica."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from emdata.stage import run_stage

REPO = Path(__file__).resolve().parents[1]
PARAMS = """
mirror: {{url: "{mirror}", serves: replica}}
download: {{workers: 2, retries: 1, backoff_s: 0}}
epfl:
  splits: [training, testing]
  include_volumedata: false
  keep_downloads: false
"""


@pytest.mark.slow
def test_blocks_notebook_executes(replica, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    ws = tmp_path / "repo"
    (ws / "examples").mkdir(parents=True)
    (ws / "dvc.yaml").write_text("stages: {}\n")
    (ws / "params.yaml").write_text(PARAMS.format(mirror=replica.base_url))
    run_stage("epfl", repo_root=ws)
    notebook = ws / "examples" / "blocks.ipynb"
    shutil.copy(REPO / "examples" / "blocks.ipynb", notebook)
    monkeypatch.delenv("EMDATA_DATA_ROOT", raising=False)
    nb = nbformat.read(notebook, as_version=4)
    # The kernel starts in examples/: open_array("epfl") has to find data/epfl.zarr by walking up to dvc.yaml.
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(notebook.parent)}}).execute()
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "(20, 96, 128) uint8" in outputs  # the small replica's EPFL training split
    assert "workers start with: forkserver" in outputs
    assert "after resume:" in outputs and "blocks written; pending: []" in outputs
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors
