"""Start and always stop a real ComfyUI server (``main.py --cpu``) on a free loopback port.

Used by the demo and by the tests. The server runs in its own process group, so stopping it
also stops anything it started; it is stopped when the ``with`` block ends for any reason
(an exception, Ctrl-C). It loads the pack of the checkout this file is in, through a link in its
own work folder (``--base-directory``), so servers of two checkouts can run side by side on one host.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from host import link_pack


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log_path: Path

    def get_json(self, path: str, timeout: float = 30.0) -> object:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.load(response)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _stop(process: subprocess.Popen) -> None:
    """Stop the server and everything it started: SIGTERM to its process group, then SIGKILL."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


def frontend_arguments() -> list[str]:
    """``--front-end-root`` when ``LORATORIO_FRONTEND_ROOT`` names another frontend build to serve
    (``tools/compat.py --frontend VERSION`` sets it); ComfyUI's installed frontend otherwise."""
    root = os.environ.get("LORATORIO_FRONTEND_ROOT")
    return ["--front-end-root", root] if root else []


@contextlib.contextmanager
def comfyui_server(
    comfyui_dir: Path,
    work_dir: Path,
    startup_timeout: float = 240.0,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Iterator[RunningServer]:
    """A ComfyUI server with this checkout's pack loaded; its custom_nodes, output, temp and user
    folders live in ``work_dir``. ``env``: variables set for the server on top of this process's
    environment."""
    port = free_port()
    for name in ("output", "temp", "user", "input"):
        (work_dir / name).mkdir(parents=True, exist_ok=True)
    # with --base-directory the server loads custom nodes from work_dir alone: this checkout's pack,
    # and none of the host's custom_nodes
    link_pack(work_dir / "custom_nodes")
    log_path = work_dir / "server.log"
    cmd = [
        sys.executable,
        "main.py",
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-auto-launch",
        "--base-directory",
        str(work_dir),
        "--output-directory",
        str(work_dir / "output"),
        "--temp-directory",
        str(work_dir / "temp"),
        "--input-directory",
        str(work_dir / "input"),
        "--user-directory",
        str(work_dir / "user"),
        "--database-url",
        "sqlite:///:memory:",
        *frontend_arguments(),
        *extra_args,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd, cwd=comfyui_dir, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = RunningServer(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with status {process.returncode} while starting:\n{server.log()[-4000:]}")
            try:
                server.get_json("/system_stats", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"ComfyUI did not answer within {startup_timeout:.0f} s:\n{server.log()[-4000:]}"
                    ) from None
                time.sleep(0.5)
        yield server
    finally:
        _stop(process)
