#!/usr/bin/env python3
"""Run this pack's whole test suite against any ComfyUI tree (the compatibility harness).

    python3 tools/compat.py extract --mirror GIT_DIR --commit REV --out DIR
        write the files of commit REV of a ComfyUI git mirror (e.g. one the ``fetch`` tool brought)
        into DIR; blobs the mirror lacks (some mirrors drop files of 4 MiB or more) are listed, not fatal
    python3 tools/compat.py setup --comfyui DIR
        build (or reuse) a virtual environment for that tree and print where it is
    python3 tools/compat.py test --comfyui DIR [--frontend VERSION] [-- PYTEST_ARGS...]
        the whole suite (browser tests included) against that tree: ``make compat COMFYUI=DIR``;
        ``--frontend`` serves another ``comfyui-frontend-package`` release (e.g. the newest on PyPI)
        instead of the one the tree pins (``make compat COMFYUI=DIR FRONTEND=1.58.1``)

The environment for a tree lives in ``$LORATORIO_CACHE/compat-<key>`` (default cache
``~/.cache/comfyui-loratorio``), keyed by the tree's ``requirements.txt``, its version and this
interpreter, so trees with the same requirements share one. It holds the tree's own requirements
from the package registry, with the frontend package the tree pins, plus the test tools. Trees
newer than 0.3.75 need torch >= 2.8: ``torch==2.14.1 torchvision==0.29.1`` (files on this
machine's disk) and torchaudio without its dependencies, which would pull another torch.

The suite then runs through ``tools/host.py`` with ``LORATORIO_COMFYUI`` / ``LORATORIO_PYTHON``
pointing at the tree and that environment: the same tests, the same fixtures, a different host.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

from host import PACK_DIR, HostError, cache_root, run_pip, say

# torch and the wheels built against it: installed first, at versions that exist for this
# machine's Python, so the tree's unpinned ``torch`` / ``torchvision`` lines are already satisfied
TORCH_FOR_NEW_TREES = ("torch==2.14.1", "torchvision==0.29.1")
TORCHAUDIO_FOR_NEW_TREES = "torchaudio==2.11.1"
TORCH_PACKAGES = re.compile(r"^(torch|torchvision|torchaudio)\b", re.IGNORECASE)
READY_MARKER = ".ready"


def comfyui_version(tree: Path) -> str:
    text = (tree / "comfyui_version.py").read_text()
    match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text)
    if match is None:
        raise HostError(f"{tree}/comfyui_version.py names no __version__")
    return match.group(1)


def check_tree(tree: Path) -> Path:
    tree = tree.expanduser().resolve()
    missing = [name for name in ("main.py", "comfy", "requirements.txt", "comfyui_version.py") if not (tree / name).exists()]
    if missing:
        raise HostError(f"{tree} is not a ComfyUI tree ({', '.join(missing)} missing); pass the folder that holds main.py")
    return tree


def pinned_frontend(tree: Path) -> str | None:
    match = re.search(r"^comfyui-frontend-package==(\S+)", (tree / "requirements.txt").read_text(), re.MULTILINE)
    return match.group(1) if match else None


def env_dir(tree: Path) -> Path:
    digest = hashlib.sha256()
    digest.update((tree / "requirements.txt").read_bytes())
    digest.update(comfyui_version(tree).encode())
    digest.update((PACK_DIR / "tools" / "test-requirements.txt").read_bytes())
    digest.update(f"{sys.version_info.major}.{sys.version_info.minor}".encode())
    return cache_root() / f"compat-{digest.hexdigest()[:12]}"


def tree_requirements_without_torch(tree: Path, out: Path) -> Path:
    lines = [line for line in (tree / "requirements.txt").read_text().splitlines() if not TORCH_PACKAGES.match(line.strip())]
    out.write_text("\n".join(lines) + "\n")
    return out


def ensure_env(tree: Path) -> Path:
    """The Python of the tree's environment, built on first use."""
    root = env_dir(tree)
    python = root / "venv" / "bin" / "python"
    if (root / READY_MARKER).is_file():
        return python
    say(f"building an environment for ComfyUI {comfyui_version(tree)} ({tree}) in {root}")
    root.mkdir(parents=True, exist_ok=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    pip = ["install", "--disable-pip-version-check", "--no-input"]
    run_pip(python, [*pip, *TORCH_FOR_NEW_TREES], "installing torch for a newer ComfyUI tree")
    run_pip(python, [*pip, "--no-deps", TORCHAUDIO_FOR_NEW_TREES], "installing torchaudio")
    requirements = tree_requirements_without_torch(tree, root / "requirements-without-torch.txt")
    run_pip(python, [*pip, "-r", str(requirements)], f"installing {tree}/requirements.txt")
    run_pip(python, [*pip, "-r", str(PACK_DIR / "tools" / "test-requirements.txt")], "installing the test tools")
    (root / READY_MARKER).write_text(f"{tree}\n")
    return python


def ensure_frontend(version: str) -> Path:
    """The static files of ``comfyui-frontend-package==version``, installed on their own (no
    dependencies) beside the environments, for ComfyUI's ``--front-end-root``."""
    target = cache_root() / f"frontend-{version}"
    static = target / "comfyui_frontend_package" / "static"
    if not (static / "index.html").is_file():
        say(f"installing comfyui-frontend-package=={version} into {target}")
        run_pip(
            Path(sys.executable),
            [
                "install",
                "--disable-pip-version-check",
                "--no-deps",
                "--upgrade",
                "--target",
                str(target),
                f"comfyui-frontend-package=={version}",
            ],
            f"installing the frontend {version}",
        )
    return static


def extract(mirror: Path, commit: str, out: Path) -> None:
    """Write every blob of ``commit`` under ``out``; blobs the mirror lacks are reported."""
    if out.exists() and any(out.iterdir()):
        raise HostError(f"{out} exists and is not empty; pass a new folder")
    listing = subprocess.run(
        ["git", "--git-dir", str(mirror), "ls-tree", "-r", "-z", commit], capture_output=True, check=True
    ).stdout.decode()
    entries = []
    for record in filter(None, listing.split("\0")):
        meta, path = record.split("\t", 1)
        mode, kind, sha = meta.split()
        if kind == "blob":
            entries.append((mode, sha, path))
    batch = subprocess.Popen(
        ["git", "--git-dir", str(mirror), "cat-file", "--batch"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert batch.stdin is not None and batch.stdout is not None
    missing = []
    for mode, sha, path in entries:
        batch.stdin.write(f"{sha}\n".encode())
        batch.stdin.flush()
        header = batch.stdout.readline().decode().split()
        if header[-1] == "missing":
            missing.append(path)
            continue
        data = batch.stdout.read(int(header[2]))
        batch.stdout.read(1)  # the newline after each object
        target = out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if mode == "120000":
            target.symlink_to(data.decode())
        else:
            target.write_bytes(data)
            if mode == "100755":
                target.chmod(0o755)
    batch.stdin.close()
    batch.wait()
    for folder in ("custom_nodes", "models/checkpoints", "models/loras", "input", "output"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    say(f"wrote {len(entries) - len(missing)} files of {commit} to {out}")
    if missing:
        say(f"{len(missing)} blobs are missing from the mirror: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    extract_parser = sub.add_parser("extract", help="write a commit of a ComfyUI git mirror into a folder")
    extract_parser.add_argument("--mirror", type=Path, required=True, help="the mirror's git directory")
    extract_parser.add_argument("--commit", required=True, help="a commit, tag or branch of the mirror")
    extract_parser.add_argument("--out", type=Path, required=True, help="a new folder for the tree")
    for name, help_text in (("setup", "build the tree's environment"), ("test", "run the suite against the tree")):
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--comfyui", type=Path, required=True, help="the ComfyUI folder (the one with main.py)")
        command.add_argument("--frontend", help="serve this comfyui-frontend-package version instead of the tree's pin")
        command.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: arguments for pytest")
    options = parser.parse_args(argv)
    try:
        if options.command == "extract":
            extract(options.mirror, options.commit, options.out.expanduser().resolve())
            return 0
        tree = check_tree(options.comfyui)
        python = ensure_env(tree)
        frontend_root = ensure_frontend(options.frontend) if options.frontend else None
    except (HostError, subprocess.CalledProcessError) as error:
        print(f"[compat] error: {error}", file=sys.stderr)
        return 2
    frontend = options.frontend or pinned_frontend(tree)
    print(f"COMFYUI_DIR={tree}\nPYTHON={python}\nVERSION={comfyui_version(tree)}\nFRONTEND={frontend}", flush=True)
    if options.command == "setup":
        return 0
    env = {**os.environ, "LORATORIO_COMFYUI": str(tree), "LORATORIO_PYTHON": str(python)}
    if frontend_root is not None:
        env["LORATORIO_FRONTEND_ROOT"] = str(frontend_root)
    env["VIRTUAL_ENV"] = str(python.parent.parent)
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    pytest_args = options.pytest_args[1:] if options.pytest_args[:1] == ["--"] else options.pytest_args
    host = [sys.executable, str(PACK_DIR / "tools" / "host.py"), "run", "--", "-m", "pytest", *pytest_args]
    return subprocess.call(host, env=env, cwd=PACK_DIR)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
