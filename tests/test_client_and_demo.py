"""The headless client and the demo, run as a user runs them: as programs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.server
PACK_DIR = Path(__file__).resolve().parent.parent
CLIENT = [sys.executable, str(PACK_DIR / "tools" / "comfy_client.py")]


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=PACK_DIR)


def assert_sane_image(path: Path) -> None:
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert pixels.std() > 5, f"{path.name} is (nearly) constant"
    assert 5 < pixels.mean() < 250, f"{path.name} is (nearly) all black or white"


def test_client_reports_validation_errors_verbatim_and_the_server_runs_the_next_job(server, demo_models, tmp_path):
    _, checkpoint, loras = demo_models
    workflow = str(PACK_DIR / "workflows" / "api" / "loratorio.json")
    common = ["--server", server.url, "--out", str(tmp_path), "--checkpoint", checkpoint, "--param", "steps=2"]
    common += ["--param", "width=64", "--param", "height=64"]
    bad = run([*CLIENT, workflow, *common, "--lora", f"{loras[0]}:1.0", "--lora", "missing-lora.safetensors:0.5"])
    assert bad.returncode == 1
    assert "ComfyUI rejected the workflow" in bad.stderr
    assert "Value not in list" in bad.stderr and "missing-lora.safetensors" in bad.stderr
    good = run([*CLIENT, workflow, *common, "--lora", loras[0], "--lora", f"{loras[1]}:0.7", "--seed", "4", "--seed", "5"])
    assert good.returncode == 0, good.stderr
    outputs = [Path(line) for line in good.stdout.split()]
    assert len(outputs) == 4  # two seeds x (image + weight maps)
    for path in outputs:
        assert_sane_image(path)


def test_client_reports_execution_errors(server, demo_models, tmp_path):
    _, checkpoint, loras = demo_models
    workflow = str(PACK_DIR / "workflows" / "lora-composite.json")  # the UI format works too
    result = run([*CLIENT, workflow, "--server", server.url, "--out", str(tmp_path), "--checkpoint", checkpoint,
                  "--lora", loras[0], "--lora", loras[0], "--param", "steps=1"])  # fmt: skip
    assert result.returncode == 1
    assert "ComfyUI failed in node" in result.stderr and "is in the stack twice" in result.stderr


def test_client_spreads_jobs_over_several_servers(server, demo_models, tmp_path, comfyui_dir):
    from support.server import comfyui_server

    models_dir, _, loras = demo_models
    config = tmp_path / "paths.yaml"
    config.write_text(f"demo:\n  base_path: {models_dir}\n  checkpoints: checkpoints\n  loras: loras\n")
    with comfyui_server(comfyui_dir, tmp_path / "second", extra_args=("--extra-model-paths-config", str(config))) as second:
        result = run([*CLIENT, str(PACK_DIR / "workflows" / "api" / "lora-switch.json"), "--server", server.url,
                      "--server", second.url, "--out", str(tmp_path / "out"), "--lora", loras[0], "--lora", loras[2],
                      "--param", "steps=2", "--param", "width=64", "--param", "height=64",
                      *[arg for seed in range(4) for arg in ("--seed", str(seed))]])  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert f"[{server.url}]" in result.stderr and f"[{second.url}]" in result.stderr
    assert len(result.stdout.split()) == 4


def test_demo_runs_every_method_and_writes_the_comparison_sheet(demo_models, tmp_path):
    models_dir, _, _ = demo_models
    env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, str(PACK_DIR / "tools" / "demo.py"), "--steps", "2", "--size", "64", "--seed", "1", "--seed", "2",
         "--models-dir", str(models_dir), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, env=env, cwd=PACK_DIR,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "comparison sheet" in result.stdout and "ComfyUI stopped" in result.stdout
    images = sorted((tmp_path / "images").glob("*.png"))
    methods = ("lora-merge-baseline", "lora-switch", "lora-composite", "loratorio", "loratorio-dynamic-pool")
    for method in methods:
        for seed in (1, 2):
            assert any(p.name.startswith(f"{method}_seed{seed}_8_") for p in images), f"no image for {method} seed {seed}"
    assert len(images) == 10 + 4  # the two LoRAtorio workflows also save their weight maps
    for path in images:
        assert_sane_image(path)
    sheet = Image.open(tmp_path / "comparison.png")
    assert sheet.width > 5 * 64 and sheet.height > 2 * 64
    assert_sane_image(tmp_path / "comparison.png")


def test_client_keeps_saved_images_and_falls_back_to_previews():
    from comfy_client import result_images

    saved = {"filename": "a.png", "subfolder": "", "type": "output"}
    preview = {"filename": "b.png", "subfolder": "", "type": "temp"}
    both = {"outputs": {"6": {"images": [preview]}, "8": {"images": [saved]}}}
    assert result_images(both) == [("8", 0, saved)]
    only_previews = {"outputs": {"6": {"images": [preview]}, "7": {"latents": []}}}
    assert result_images(only_previews) == [("6", 0, preview)]
    assert result_images({"outputs": {}}) == []
