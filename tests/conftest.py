"""Puts the real ComfyUI host on the path and builds the fixtures every test shares.

Run the tests through ``make test`` (or ``python3 tools/host.py run -- -m pytest``), which sets
``LORATORIO_COMFYUI_DIR`` to the pinned host's ComfyUI folder.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

PACK_DIR = Path(__file__).resolve().parent.parent
TESTS_DIR = Path(__file__).resolve().parent
COMFYUI_DIR = Path(os.environ.get("LORATORIO_COMFYUI_DIR", ""))
PACK_PACKAGE = "comfyui_loratorio"

if not (COMFYUI_DIR / "comfy").is_dir():
    raise pytest.UsageError(
        "LORATORIO_COMFYUI_DIR does not point at a ComfyUI folder; run the tests with `make test`, "
        "which builds the pinned ComfyUI host and sets it"
    )

# ComfyUI's folder first: its top-level `nodes` module must win over this pack's `nodes/` package.
sys.path.insert(0, str(COMFYUI_DIR))
sys.path.append(str(PACK_DIR))
sys.path.append(str(TESTS_DIR))

from comfy.cli_args import args  # noqa: E402

args.cpu = True  # before comfy.model_management is first imported


def load_pack():
    """Import this pack as a package, the way ComfyUI imports a custom node folder."""
    if PACK_PACKAGE in sys.modules:
        return sys.modules[PACK_PACKAGE]
    spec = importlib.util.spec_from_file_location(
        PACK_PACKAGE, PACK_DIR / "__init__.py", submodule_search_locations=[str(PACK_DIR)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_PACKAGE] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def pack():
    return load_pack()


@pytest.fixture(scope="session")
def engine(pack):
    """The pack's ComfyUI layer modules, as one namespace."""
    from comfyui_loratorio.loratorio_comfy import adapter_set, adapters, build, guiders, row_lora, sampling

    modules = (adapter_set, adapters, build, guiders, row_lora, sampling)
    return type("Engine", (), {m.__name__.rsplit(".", 1)[-1]: m for m in modules})


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    return COMFYUI_DIR


@pytest.fixture(scope="session")
def tiny_model_factory():
    from support.tiny_models import build_model

    cache: dict[tuple[str, int], object] = {}

    def build(family: str, seed: int = 0):
        if (family, seed) not in cache:
            cache[(family, seed)] = build_model(family, seed)
        return cache[(family, seed)]

    return build


@pytest.fixture
def loras_folder(tmp_path, monkeypatch) -> Path:
    """A fresh folder registered as ComfyUI's only ``loras`` folder for one test."""
    import folder_paths

    folder = tmp_path / "loras"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(folder)], folder_paths.supported_pt_extensions))
    folder_paths.filename_list_cache.pop("loras", None)
    yield folder
    folder_paths.filename_list_cache.pop("loras", None)
