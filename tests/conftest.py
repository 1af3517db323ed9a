"""Puts the real ComfyUI host on the path and builds the fixtures every test shares.

Run the tests through ``make test`` (or ``python3 tools/host.py run -- -m pytest``), which sets
``LORATORIO_COMFYUI_DIR`` to the pinned host's ComfyUI folder.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest

PACK_DIR = Path(__file__).resolve().parent.parent
TESTS_DIR = Path(__file__).resolve().parent
COMFYUI_DIR = Path(os.environ.get("LORATORIO_COMFYUI_DIR", ""))

if not (COMFYUI_DIR / "comfy").is_dir():
    raise pytest.UsageError(
        "LORATORIO_COMFYUI_DIR does not point at a ComfyUI folder; run the tests with `make test`, "
        "which builds the pinned ComfyUI host and sets it"
    )

# ComfyUI's folder first: its top-level `nodes` module must win over this pack's `nodes/` package.
sys.path.insert(0, str(COMFYUI_DIR))
sys.path.append(str(PACK_DIR))
sys.path.append(str(TESTS_DIR))
sys.path.append(str(PACK_DIR / "tools"))

from comfy.cli_args import args  # noqa: E402
from host_env import load_pack  # noqa: E402

# The suite runs on the CPU; ``LORATORIO_TEST_DEVICE=gpu`` runs it on ComfyUI's GPU instead (a device check),
# with ComfyUI's dynamic VRAM started as its ``main.py`` starts it where the release has one.
TEST_DEVICE = os.environ.get("LORATORIO_TEST_DEVICE", "cpu")
if TEST_DEVICE not in ("cpu", "gpu"):
    raise pytest.UsageError(f"LORATORIO_TEST_DEVICE is {TEST_DEVICE!r}; use cpu (the default) or gpu")
args.cpu = TEST_DEVICE == "cpu"  # before comfy.model_management is first imported
if TEST_DEVICE == "gpu":
    import torch

    from support import dynamic_vram

    dynamic_vram.start()
    # the tests compare float32 results to about 1e-5: no TF32 where ComfyUI leaves the choice to torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


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


# --- a real server with the demo models, shared by the server tests ------------------------------


@pytest.fixture(scope="session")
def demo_models() -> tuple[Path, str, list[str]]:
    """The demo checkpoint and LoRAs, built once per machine in the host cache."""
    import demo_assets

    cache = Path(os.environ.get("LORATORIO_CACHE", Path.home() / ".cache" / "comfyui-loratorio"))
    models_dir = cache / f"demo-assets-v{demo_assets.ASSET_VERSION}"
    checkpoint, loras = demo_assets.ensure_demo_assets(models_dir)
    return models_dir, checkpoint.name, [p.name for p in loras]


UNPICKLED_MARKER = "/tmp/loratorio-server-unpickled-marker"


class _Unpickled:
    """Unpickling this object creates ``UNPICKLED_MARKER``: the proof that a loader unpickled."""

    def __reduce__(self):
        return (open, (UNPICKLED_MARKER, "w"))


@pytest.fixture(scope="session")
def unpickled_marker() -> Path:
    """The file that appears if any loader ever unpickles the pickled LoRA of ``bad_loras``."""
    marker = Path(UNPICKLED_MARKER)
    marker.unlink(missing_ok=True)
    return marker


@pytest.fixture(scope="session")
def pickled_lora(unpickled_marker) -> bytes:
    """A pickled "LoRA" whose loading by unpickling would create ``unpickled_marker``."""
    return pickle.dumps({"lora_unet_x.lora_up.weight": _Unpickled()})


@pytest.fixture(scope="session")
def bad_loras(tmp_path_factory, pickled_lora) -> Path:
    """LoRA files a user might drop into the loras folder: pickled, corrupt, for another architecture."""
    from support.lora_files import write_lora
    from support.tiny_models import build_model

    folder = tmp_path_factory.mktemp("bad_loras")
    (folder / "pickled.ckpt").write_bytes(pickled_lora)
    (folder / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + b"\x00" * 64)
    write_lora(folder / "flux-lora.safetensors", "flux", build_model("flux").model, "kohya")
    return folder


@pytest.fixture(scope="session")
def server(demo_models, bad_loras, comfyui_dir, tmp_path_factory):
    models_dir, _, _ = demo_models
    work = tmp_path_factory.mktemp("server")
    config = work / "extra_model_paths.yaml"
    config.write_text(
        f"loratorio_demo:\n  base_path: {models_dir}\n  checkpoints: checkpoints\n  loras: loras\n"
        f"loratorio_bad:\n  base_path: {bad_loras}\n  loras: .\n"
    )
    from support.server import comfyui_server

    with comfyui_server(comfyui_dir, work, extra_args=("--extra-model-paths-config", str(config))) as running:
        yield running


@pytest.fixture(scope="session")
def toy_server(comfyui_dir, tmp_path_factory):
    """A real server with the toy world: the demo-only toy nodes, the concept LoRAs, the pack."""
    from toy_world import write_server_config

    from support.server import comfyui_server

    work = tmp_path_factory.mktemp("toy-server")
    config = write_server_config(work)
    arguments = ("--extra-model-paths-config", str(config))
    with comfyui_server(comfyui_dir, work, extra_args=arguments, env={"OMP_NUM_THREADS": "1"}) as running:
        yield running
