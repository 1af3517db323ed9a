"""Prompts queued through the real server's HTTP API: composition runs, bad inputs come back as
clear errors, and the same server keeps serving the next job."""

from __future__ import annotations

import importlib.util
import math
import os
import pickle
from pathlib import Path

import pytest

from support.lora_files import write_lora
from support.server import comfyui_server, execution_error, run_prompt
from support.tiny_models import build_model
from support.workflows import composition_prompt

pytestmark = pytest.mark.server
PACK_DIR = Path(__file__).resolve().parent.parent


def load_demo_assets_module():
    spec = importlib.util.spec_from_file_location("loratorio_demo_assets", PACK_DIR / "tools" / "demo_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_models() -> tuple[Path, str, list[str]]:
    """The demo checkpoint and LoRAs, built once per machine in the host cache."""
    assets = load_demo_assets_module()
    cache = Path(os.environ.get("LORATORIO_CACHE", Path.home() / ".cache" / "comfyui-loratorio"))
    models_dir = cache / f"demo-assets-v{assets.ASSET_VERSION}"
    checkpoint, loras = assets.ensure_demo_assets(models_dir)
    return models_dir, checkpoint.name, [p.name for p in loras]


class _Unpickled:
    PATH = "/tmp/loratorio-server-unpickled-marker"

    def __reduce__(self):
        return (open, (self.PATH, "w"))


@pytest.fixture(scope="module")
def bad_loras(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad_loras")
    (folder / "pickled.ckpt").write_bytes(pickle.dumps({"x": _Unpickled()}))
    (folder / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + b"\x00" * 64)
    write_lora(folder / "flux-lora.safetensors", "flux", build_model("flux").model, "kohya")
    return folder


@pytest.fixture(scope="module")
def server(demo_models, bad_loras, comfyui_dir, tmp_path_factory):
    models_dir, _, _ = demo_models
    work = tmp_path_factory.mktemp("server")
    config = work / "extra_model_paths.yaml"
    config.write_text(
        f"loratorio_demo:\n  base_path: {models_dir}\n  checkpoints: checkpoints\n  loras: loras\n"
        f"loratorio_bad:\n  base_path: {bad_loras}\n  loras: .\n"
    )
    with comfyui_server(comfyui_dir, work, extra_args=("--extra-model-paths-config", str(config))) as running:
        yield running


def assert_composed_image(server, entry) -> None:
    assert execution_error(entry) is None, execution_error(entry)
    images = entry["outputs"]["8"]["images"]
    assert len(images) == 1 and images[0]["filename"].startswith("loratorio-test")


@pytest.mark.parametrize("sampler_node", ["LoRAtorioSampler", "LoRACompositeSampler", "LoRASwitchSampler"])
def test_composition_through_the_http_api(server, demo_models, sampler_node):
    _, checkpoint, loras = demo_models
    entry = run_prompt(server, composition_prompt(checkpoint, [(loras[0], 1.0), (loras[1], 0.8)], sampler_node))
    assert_composed_image(server, entry)


def test_missing_lora_is_rejected_by_validation(server, demo_models):
    _, checkpoint, loras = demo_models
    entry = run_prompt(server, composition_prompt(checkpoint, [(loras[0], 1.0), ("not-there.safetensors", 1.0)]))
    assert "rejected" in entry
    assert "not-there.safetensors" in str(entry["rejected"]["node_errors"])


@pytest.mark.parametrize(
    ("lora", "strength", "message"),
    [
        ("pickled.ckpt", 1.0, "not a .safetensors file"),
        ("corrupt.safetensors", 1.0, "truncated or corrupt"),
        ("flux-lora.safetensors", 1.0, "matches none of the layers of this model (SD15)"),
        ("DUPLICATE", 1.0, "is in the stack twice"),
        ("EMPTY", 1.0, "the LoRA stack is empty"),
        ("NAN", math.nan, "finite number"),
    ],
)
def test_bad_inputs_are_clear_errors_and_the_server_stays_up(server, demo_models, lora, strength, message):
    _, checkpoint, loras = demo_models
    rows = {"DUPLICATE": [(loras[0], 1.0), (loras[0], 1.0)], "EMPTY": [], "NAN": [(loras[0], strength)]}.get(
        lora, [(lora, strength)]
    )
    entry = run_prompt(server, composition_prompt(checkpoint, rows))
    error = execution_error(entry) if "rejected" not in entry else str(entry["rejected"])
    assert error is not None and message in error, error
    assert not Path(_Unpickled.PATH).exists()
    assert server.process.poll() is None
    follow_up = run_prompt(server, composition_prompt(checkpoint, [(loras[2], 1.0), (loras[3], 1.0)]))
    assert_composed_image(server, follow_up)
