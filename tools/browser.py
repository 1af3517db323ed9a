#!/usr/bin/env python3
"""Make sure a Chromium for the graph-editor tests is on this machine.

    python3 tools/browser.py        find Chromium, installing Debian's ``chromium`` package if missing

Playwright cannot download its own browsers here, so the tests drive the system's Chromium.
Installing needs apt and root (or password-less sudo); when that is not possible this prints why
and exits 0, and the browser tests skip with the same reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DEBIAN_PACKAGE = "chromium"
# Headless flags for a machine without a GPU, a display or internet (Chromium's background
# connections would otherwise fail, many at a time).
CHROMIUM_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def say(message: str) -> None:
    print(f"[browser] {message}", flush=True)


def chromium_path() -> str | None:
    """The Chromium to drive: ``$LORATORIO_CHROMIUM`` if set, else the first one on ``PATH``."""
    configured = os.environ.get("LORATORIO_CHROMIUM")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def apt_command() -> list[str] | None:
    """``apt-get`` as root (directly or through password-less sudo), or None when neither is possible."""
    if shutil.which("apt-get") is None:
        return None
    if os.geteuid() == 0:
        return ["apt-get"]
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n", "apt-get"]
    return None


def install_chromium() -> str:
    """Install Debian's Chromium; returns why it could not when it fails (else an empty string)."""
    apt = apt_command()
    if apt is None:
        return "no apt-get with root rights here; install Chromium yourself or set LORATORIO_CHROMIUM=/path/to/chromium"
    environ = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*apt, "install", "-y", "--no-install-recommends", DEBIAN_PACKAGE]
    say(f"installing Debian's {DEBIAN_PACKAGE} for the graph-editor tests")
    if subprocess.run(install, env=environ, capture_output=True).returncode != 0:
        subprocess.run([*apt, "update"], env=environ, capture_output=True)
        result = subprocess.run(install, env=environ, capture_output=True, text=True)
        if result.returncode != 0:
            return f"'{' '.join(install)}' failed: {result.stderr.strip()[-500:]}"
    return ""


def main() -> int:
    found = chromium_path()
    if found is None:
        problem = install_chromium()
        found = chromium_path()
        if found is None:
            say(f"no Chromium: {problem or 'the package installed no chromium command'}; the browser tests will skip")
            return 0
    say(f"using {found}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
