"""What a tool run inside the pinned host (``python3 tools/host.py run -- tools/X.py``) does first:
put the host's ComfyUI on the path, and import this pack the way ComfyUI imports a custom node."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

PACK_DIR = Path(__file__).resolve().parent.parent
PACK_PACKAGE = "comfyui_loratorio"


def comfyui_on_path(script: str, cpu: bool = True) -> Path:
    """The host's ComfyUI folder, put first on ``sys.path`` (its ``nodes`` must win over the pack's
    ``nodes/``), with the tests' fixture writers after it; exits with the right command otherwise."""
    comfyui = Path(os.environ.get("LORATORIO_COMFYUI_DIR", ""))
    if not (comfyui / "comfy").is_dir():
        sys.exit(f"run this through the host: python3 tools/host.py run -- tools/{script}")
    if str(comfyui) not in sys.path:
        sys.path.insert(0, str(comfyui))
        sys.path.append(str(PACK_DIR / "tests"))  # the seeded-weight and LoRA writers the tests use
    from comfy.cli_args import args

    args.cpu = cpu  # before comfy.model_management is first imported
    return comfyui


def load_pack() -> ModuleType:
    """Import this pack as the package ``comfyui_loratorio`` (once)."""
    if PACK_PACKAGE in sys.modules:
        return sys.modules[PACK_PACKAGE]
    spec = importlib.util.spec_from_file_location(
        PACK_PACKAGE, PACK_DIR / "__init__.py", submodule_search_locations=[str(PACK_DIR)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_PACKAGE] = module
    spec.loader.exec_module(module)
    return module
