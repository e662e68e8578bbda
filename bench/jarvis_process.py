"""A `jarvis serve` subprocess for the benchmarks: a free port on 127.0.0.1, a temp work dir, ready or the log.

Only the `JARVIS_*` settings a benchmark passes reach the server (plus JARVIS_DATA_DIR from the
environment, so the embedded model is not assembled again), so a developer's .env or shell does not
skew a comparison. The server's log is printed when it fails to start, or when it logged an error.
`checkout_env` makes such a server import another checkout (a before/after comparison in one run).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx


def checkout_env(checkout: Path | None, workdir: Path) -> dict[str, str]:
    """The environment whose `import jarvis` loads `checkout` (None: the installed tree, this one). A checkout
    keeps backends/ and plugins/ beside jarvis/; the build maps them into it, and so does a folder of links."""
    if checkout is None:
        return {}
    package = workdir / "jarvis"
    package.mkdir(parents=True)
    for entry in (checkout / "jarvis").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry.resolve())
    for part in ("backends", "plugins"):
        (package / part).symlink_to((checkout / part).resolve())
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(workdir), os.environ.get("PYTHONPATH")]))}


def wait_ready(base_url: str, process: subprocess.Popen, log: IO[str], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            status = httpx.get(f"{base_url}/health", timeout=5).json().get("status")
            if status == "ready":
                return
            if status == "failed":
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    log.seek(0)
    raise RuntimeError(f"Jarvis did not become ready (exit code {process.poll()}):\n{log.read()[-5000:]}")


@contextmanager
def jarvis_server(ready_timeout_s: float = 180, **settings: str) -> Iterator[str]:
    """A fresh server with `settings` (JARVIS_* names); yields its /v1 base URL once /health says ready."""
    with jarvis_server_process(ready_timeout_s, **settings) as (v1, _):
        yield v1


@contextmanager
def jarvis_server_process(ready_timeout_s: float = 180, **settings: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`jarvis_server`, yielding the server's process too (for its CPU time)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JARVIS_") or k == "JARVIS_DATA_DIR"}
    with tempfile.TemporaryDirectory() as workdir, open(Path(workdir) / "server.log", "w+") as log:
        env.update({"JARVIS_HOST": "127.0.0.1", "JARVIS_PORT": str(port), "JARVIS_LOG_LEVEL": "warning",
                    "JARVIS_STATE_DIR": str(Path(workdir) / "state"), **settings})
        process = subprocess.Popen([sys.executable, "-m", "jarvis", "serve"], env=env, cwd=workdir,
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(f"http://127.0.0.1:{port}", process, log, ready_timeout_s)
            yield f"http://127.0.0.1:{port}/v1", process
        finally:
            exited = process.poll()
            process.terminate()
            process.wait(timeout=60)
            log.seek(0)
            text = log.read()
            if exited is not None or "Traceback" in text or " ERROR " in text:
                print(f"--- Jarvis server log (exit code {exited}) ---\n{text[-5000:]}", file=sys.stderr)
