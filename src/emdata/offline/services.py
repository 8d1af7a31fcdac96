"""Start the project's loopback servers (replica, S3) as child processes and always stop them."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from emdata.errors import EmDataError


@contextmanager
def child_server(args: Sequence[str], *, name: str, startup_timeout_s: float = 900.0,
                 log_file: Path | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run ``python -m <args>``; yield the first line it prints (its base URL); terminate it on exit."""
    stderr: int | IO[bytes] | None = None
    log: IO[bytes] | None = None
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log = log_file.open("ab")
        stderr = log
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=stderr,
                            stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.strip())
        lines.put("")  # end of output: the process exited

    threading.Thread(target=pump, daemon=True).start()
    try:
        try:
            url = lines.get(timeout=startup_timeout_s)
        except queue.Empty:
            raise EmDataError(f"{name} did not start within {startup_timeout_s:.0f} s") from None
        if proc.poll() is not None or not url.startswith("http"):
            raise EmDataError(f"{name} failed to start (exit {proc.poll()}, printed {url!r})")
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log is not None:
            log.close()


@contextmanager
def replica(profile: str = "full", sources: Sequence[str] | None = None, port: int = 0,
            **kwargs: object) -> Iterator[str]:
    args = ["emdata.offline.replica", "serve", "--profile", profile, "--port", str(port)]
    if sources is not None:
        args += ["--sources", ",".join(sources)]
    with child_server(args, name="replica", **kwargs) as url:  # type: ignore[arg-type]
        yield url


@contextmanager
def s3(buckets: Sequence[str], **kwargs: object) -> Iterator[str]:
    with child_server(["emdata.offline.s3server", *buckets], name="S3 endpoint (moto)",
                      startup_timeout_s=120, **kwargs) as url:  # type: ignore[arg-type]
        yield url
