"""Prompts queued through the real server's HTTP API: composition runs, bad inputs come back as
clear errors, and the same server keeps serving the next job."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from support.server import execution_error, run_prompt
from support.workflows import composition_prompt

pytestmark = pytest.mark.server


def assert_composed_image(server, entry) -> None:
    assert execution_error(entry) is None, execution_error(entry)
    images = entry["outputs"]["8"]["images"]
    assert len(images) == 1 and images[0]["filename"].startswith("loratorio-test")


@pytest.mark.parametrize("sampler_node", ["LoRAtorioSampler", "LoRAtorioCompositeSampler", "LoRAtorioSwitchSampler"])
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
        ("pickled.ckpt", 1.0, "'received_value': 'pickled.ckpt'"),  # not offered by the loader: validation rejects it
        ("corrupt.safetensors", 1.0, "truncated or corrupt"),
        ("flux-lora.safetensors", 1.0, "matches none of the layers of this model (SD15)"),
        ("DUPLICATE", 1.0, "is in the stack twice"),
        ("EMPTY", 1.0, "the LoRA stack is empty"),
        ("NAN", math.nan, "finite number"),
    ],
)
def test_bad_inputs_are_clear_errors_and_the_server_stays_up(server, demo_models, unpickled_marker, lora, strength, message):
    _, checkpoint, loras = demo_models
    rows = {"DUPLICATE": [(loras[0], 1.0), (loras[0], 1.0)], "EMPTY": [], "NAN": [(loras[0], strength)]}.get(
        lora, [(lora, strength)]
    )
    entry = run_prompt(server, composition_prompt(checkpoint, rows))
    error = execution_error(entry) if "rejected" not in entry else str(entry["rejected"])
    assert error is not None and message in error, error
    assert not unpickled_marker.exists()
    assert server.process.poll() is None
    follow_up = run_prompt(server, composition_prompt(checkpoint, [(loras[2], 1.0), (loras[3], 1.0)]))
    assert_composed_image(server, follow_up)


@pytest.mark.parametrize("sampler_node", ["LoRAtorioSampler", "LoRAtorioCompositeSampler", "LoRAtorioSwitchSampler"])
def test_nan_denoise_is_a_clear_error(server, demo_models, sampler_node):
    """JSON clients can send NaN, which passes ComfyUI's range check (every comparison with NaN is false)."""
    _, checkpoint, loras = demo_models
    prompt = composition_prompt(checkpoint, [(loras[0], 1.0)], sampler_node)
    (sampler,) = [node for node in prompt.values() if node["class_type"] == sampler_node]
    sampler["inputs"]["denoise"] = math.nan
    error = execution_error(run_prompt(server, prompt))
    assert error is not None and "denoise is nan; use a number from 0 to 1" in error, error


@pytest.mark.parametrize(("socket", "value"), [("model", "notalink"), ("positive", None), ("latent_image", {})])
def test_a_socket_given_a_plain_value_is_a_clear_error_and_the_server_stays_up(server, demo_models, socket, value):
    """ComfyUI validates widgets, not what an API prompt puts in a socket input in place of a connection."""
    _, checkpoint, loras = demo_models
    prompt = composition_prompt(checkpoint, [(loras[0], 1.0)])
    prompt["6"]["inputs"][socket] = value
    error = execution_error(run_prompt(server, prompt))
    assert error is not None and f"LoRAtorio Sampler: input '{socket}' needs a" in error, error
    assert_composed_image(server, run_prompt(server, composition_prompt(checkpoint, [(loras[0], 1.0)])))


def test_a_workflow_saved_with_the_old_node_ids_still_runs(server, demo_models):
    """``tests/data/legacy-loratorio-api.json`` is ``example_workflows/api/loratorio.json`` as shipped before the
    ids were prefixed (``MultiLoRALoader``): hidden aliases keep such workflows running."""
    prompt = json.loads((Path(__file__).parent / "data" / "legacy-loratorio-api.json").read_text())
    assert prompt["5"]["class_type"] == "MultiLoRALoader"
    prompt["4"]["inputs"].update(width=64, height=64)
    prompt["6"]["inputs"]["steps"] = 2
    entry = run_prompt(server, prompt)
    assert execution_error(entry) is None, entry
    assert entry["outputs"]["8"]["images"]
    info = server.get_json("/object_info/MultiLoRALoader")["MultiLoRALoader"]
    assert info["deprecated"] is True, "the old id is hidden from the node search"
