"""emdata view: the Neuroglancer state, and the served client loaded in headless Chromium reaching the data."""

from __future__ import annotations

import io
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from emdata.errors import InvalidParameterError
from emdata.viewer import ViewerServer, describe, viewer_state
from test_cli import DVC_YAML, EPFL, HEMIBRAIN, make_epfl, make_hemibrain

TRANSLATION = (800.0, 160.0, 80.0)


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "dvc.yaml").write_text(DVC_YAML)
    make_hemibrain(root, translation_nm=TRANSLATION)
    make_epfl(root)
    return root


def chromium() -> str:
    """Debian's chromium; .ci/run installs it on a fresh CI machine, so its absence is a failure, not a skip."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail("chromium is not installed: `apt-get install -y chromium` (.ci/run installs it)")


def chromium_args(profile: Path, url: str) -> list[str]:
    # Software WebGL (SwiftShader) so no GPU is needed; no sandbox as CI containers run as root. No host name
    # resolves and only loopback is reachable, so the view works fully offline or not at all.
    return [chromium(), "--headless", "--no-sandbox", "--disable-dev-shm-usage", "--use-angle=swiftshader",
            "--enable-unsafe-swiftshader", "--no-first-run", "--remote-debugging-port=0",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--proxy-server=direct://",
            f"--user-data-dir={profile}", "--window-size=800,600", url]


@pytest.fixture()
def browser_profile(tmp_path: Path) -> Path:
    return tmp_path / "chromium-profile"


# --- the state ----------------------------------------------------------------------------------------


def test_state_places_image_and_labels(repo: Path) -> None:
    images = describe(repo / HEMIBRAIN)
    assert [(i.name, i.shape, i.voxel_size_nm, i.translation_nm) for i in images] == [
        ("", (24, 40, 36), (8.0, 8.0, 8.0), TRANSLATION)]
    state = viewer_state("hemibrain", images, "http://127.0.0.1:1/data/t/hemibrain_crop.zarr")
    assert state["dimensions"] == {"x": [8e-9, "m"], "y": [8e-9, "m"], "z": [8e-9, "m"]}
    # The centre of the image in voxels of the global dimensions, translation included (x, y, z).
    assert state["position"] == [80 / 8 + 36 / 2, 160 / 8 + 40 / 2, 800 / 8 + 24 / 2]
    image, seg = state["layers"]
    assert image["type"] == "image" and image["source"] == "zarr3://http://127.0.0.1:1/data/t/hemibrain_crop.zarr/"
    lo, hi = image["shaderControls"]["normalized"]["range"]
    assert 0 <= lo < hi <= 255
    assert seg["type"] == "segmentation"
    assert seg["source"] == "zarr3://http://127.0.0.1:1/data/t/hemibrain_crop.zarr/labels/segmentation/"


def test_epfl_groups(repo: Path) -> None:
    everything = describe(repo / EPFL)
    assert [i.name for i in everything] == ["testing", "training"]
    state = viewer_state("epfl", everything, "http://h/d/epfl.zarr")
    assert [(la["name"], la["visible"]) for la in state["layers"]] == [
        ("epfl/testing", True), ("epfl/testing mito", True), ("epfl/training", False), ("epfl/training mito", False)]
    mito = state["layers"][1]
    assert mito["source"] == "zarr3://http://h/d/epfl.zarr/testing/labels/mito/"
    assert mito["segmentColors"] == {"1": "#ff0000"} and mito["segments"] == ["1"]
    assert [i.name for i in describe(repo / EPFL, ["training"])] == ["training"]
    with pytest.raises(InvalidParameterError, match=r"no image group 'validation'.*\['testing', 'training'\]"):
        describe(repo / EPFL, ["validation"])


def test_int16_window_comes_from_the_data(tmp_path: Path) -> None:
    from emdata.ngff import Geometry, create_image_group

    data = np.random.default_rng(0).normal(-3000, 200, (16, 16, 16)).astype(np.int16)
    _, arrays = create_image_group(tmp_path / "x.zarr", name="x", shape=data.shape, dtype="int16",
                                   geometry=Geometry((3.0, 4.0, 4.0)), n_levels=1, chunks=(16, 16, 16))
    arrays[0][...] = data
    (image,) = describe(tmp_path / "x.zarr")
    lo, hi = image.intensity_range
    assert lo == pytest.approx(np.percentile(data, 0.5)) and hi == pytest.approx(np.percentile(data, 99.5))


# --- in a browser -------------------------------------------------------------------------------------


def _read_lines(stream: io.TextIOBase, out: queue.Queue[str]) -> None:
    for line in stream:
        out.put(line)


@pytest.fixture()
def view_process(repo: Path) -> Iterator[tuple[subprocess.Popen[str], queue.Queue[str], queue.Queue[str]]]:
    proc = subprocess.Popen([sys.executable, "-m", "emdata", "view", "hemibrain_crop", "--log-requests"], cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: queue.Queue[str] = queue.Queue()
    err: queue.Queue[str] = queue.Queue()
    for stream, q in ((proc.stdout, out), (proc.stderr, err)):
        threading.Thread(target=_read_lines, args=(stream, q), daemon=True).start()
    try:
        yield proc, out, err
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_view_in_headless_chromium_reaches_the_data(view_process, browser_profile: Path) -> None:  # type: ignore[no-untyped-def]
    """The printed URL, loaded in Chromium: the client parses the state and fetches zarr.json and chunks."""
    proc, out, err = view_process
    url = out.get(timeout=60).strip()
    assert url.startswith("http://127.0.0.1:") and "/v/" in url
    browser = subprocess.Popen(chromium_args(browser_profile, url), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    requests: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                requests.append(err.get(timeout=1).strip())
            except queue.Empty:
                pass
            paths = [r.split()[1] for r in requests if r.startswith(("GET ", "HEAD "))]
            got_metadata = any(p.endswith("/hemibrain_crop.zarr/zarr.json") for p in paths)
            got_label = any(p.endswith("/labels/segmentation/zarr.json") for p in paths)
            got_chunk = any(r.startswith("GET ") and "/c/" in r and r.split()[2] in ("200", "206") for r in requests)
            if got_metadata and got_label and got_chunk:
                break
        else:
            pytest.fail(f"in 30 s the client did not request zarr.json and a chunk; requests: {requests}")
    finally:
        browser.terminate()
        browser.wait(10)
    # Only the output's files, only from loopback: every request was answered from the served folder.
    assert all(r.split()[2] in ("200", "206", "304", "404") for r in requests if r.startswith(("GET ", "HEAD ")))
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert proc.wait(15) == 0


def test_view_unknown_group_unpulled_and_busy_port(repo: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "emdata", "view", "epfl", "--group", "validation"], cwd=repo,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no image group 'validation'" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "emdata", "view", "idr"], cwd=repo, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 3 and "emdata pull idr" in proc.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "emdata", "view", "hemibrain", "--port", str(port)], cwd=repo,
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"cannot serve on 127.0.0.1:{port}" in proc.stderr


def test_screenshot_shows_the_image(repo: Path, browser_profile: Path, tmp_path: Path) -> None:
    """Chromium renders the view (software WebGL); Neuroglancer's screenshot waits for every visible chunk.

    The view is centred on the image with its OME translation (800 nm = 100 slices in z, the image has 24):
    had the client ignored the translation or the voxel size, the cross-section would be empty.
    """
    from PIL import Image

    server = ViewerServer("hemibrain", repo / HEMIBRAIN, describe(repo / HEMIBRAIN), layout="xy")
    with server.viewer.txn() as state:  # the EM alone: its grey levels are what must show
        state.layers["hemibrain segmentation"].visible = False
    browser = subprocess.Popen(chromium_args(browser_profile, server.url), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    result: list[object] = []
    try:
        thread = threading.Thread(target=lambda: result.append(server.viewer.screenshot(size=[400, 400])),
                                  daemon=True)
        thread.start()
        thread.join(45)
        assert result, "no screenshot from the browser within 45 s"
    finally:
        browser.terminate()
        browser.wait(10)
        server.stop()
    png = result[0].screenshot.image  # type: ignore[attr-defined]
    target = Path(os.environ.get("EMDATA_SCREENSHOT", tmp_path / "view.png"))
    target.write_bytes(png)
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(float)
    assert pixels.shape == (400, 400, 3)
    # The slice fills the panel (zoomed to fit) in grey levels that vary like the data. The upper-left quadrant
    # holds neither the axis lines (from the centre right and down) nor the scale bar; an empty cross-section
    # there is flat background grey.
    quadrant = pixels[20:180, 20:180]
    assert quadrant.std() > 20, f"the rendered slice is flat (std {quadrant.std():.1f}): nothing was drawn"
    grey = (np.ptp(quadrant, axis=2) <= 2).mean()
    assert grey > 0.99, f"only {grey:.0%} of the slice is grey: not the EM image alone"
