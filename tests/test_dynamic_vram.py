"""Under ComfyUI's dynamic VRAM (newer releases on NVIDIA: ``ModelPatcherDynamic`` with comfy-aimdo) each
composition method samples what it samples on the classic ModelPatcher, and writes no base weight.

A device check: it runs with ``LORATORIO_TEST_DEVICE=gpu`` on a ComfyUI that has dynamic VRAM, on an
NVIDIA GPU, and is skipped elsewhere with the reason."""

from __future__ import annotations

import pytest
import torch

from support import dynamic_vram
from support.engine_helpers import assert_no_hooks_left, comfy_conditioning, make_guider, run_sampler
from support.lora_files import write_lora

pytestmark = pytest.mark.skipif(dynamic_vram.STATE != "on", reason=f"dynamic VRAM is {dynamic_vram.STATE}")

METHODS = {
    "loratorio": {},
    "loratorio single pass": {"routing": "single pass", "full_steps": 1, "refresh_every": 2},
    "loratorio styles applied everywhere": {"style_loras": "applied everywhere", "style_coverage": 0.3},
    "composite": {},
    "switch": {},
}


@pytest.fixture(scope="module")
def state_dict(tiny_model_factory) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_model_factory("sd15").model.diffusion_model.state_dict().items()}


def load_like_comfyui(state_dict: dict[str, torch.Tensor], dynamic: bool):
    """The tests' tiny SD1.5 with these weights, loaded as ``comfy.sd.load_diffusion_model_state_dict``
    loads a diffusion model (whose detection does not know the tiny shapes): the model, then the
    patcher class ComfyUI picks (``CoreModelPatcher`` is ``ModelPatcherDynamic`` under dynamic VRAM),
    then the weights, assigned under dynamic VRAM."""
    import comfy.model_management
    import comfy.model_patcher

    from support.tiny_models import FAMILY_SPECS

    spec = FAMILY_SPECS["sd15"]
    load_device = comfy.model_management.get_torch_device()
    config = spec.model_class(dict(spec.unet_config))
    config.set_inference_dtype(torch.float32, None, device=load_device)
    model = config.get_model(state_dict, "")
    patcher_class = comfy.model_patcher.CoreModelPatcher if dynamic else comfy.model_patcher.ModelPatcher
    patcher = patcher_class(model, load_device=load_device, offload_device=comfy.model_management.unet_offload_device())
    model.load_model_weights({k: v.clone() for k, v in state_dict.items()}, "", assign=patcher.is_dynamic())
    return patcher


@pytest.fixture
def patchers(state_dict):
    """(dynamic, classic): the same weights, with and without dynamic VRAM."""
    import comfy.model_patcher

    dynamic, classic = load_like_comfyui(state_dict, True), load_like_comfyui(state_dict, False)
    assert isinstance(dynamic, comfy.model_patcher.ModelPatcherDynamic), type(dynamic)
    assert not isinstance(classic, comfy.model_patcher.ModelPatcherDynamic), type(classic)
    return dynamic, classic


@pytest.fixture
def stack(tiny_model_factory, loras_folder) -> list[tuple[str, float, float]]:
    model = tiny_model_factory("sd15").model
    return [
        (write_lora(loras_folder / f"dyn{i}.safetensors", "sd15", model, "kohya", seed=40 + i).name, 1.0, 1.0) for i in range(3)
    ]


def sampled(engine, method: str, patcher, stack) -> torch.Tensor:
    """The sampled latent; method "base" is plain CFG on the base model."""
    if method == "base":
        import comfy.samplers

        guider = comfy.samplers.CFGGuider(patcher)
        guider.set_conds(comfy_conditioning("sd15"), comfy_conditioning("sd15", seed=9))
        guider.set_cfg(5.0)
    else:
        guider = make_guider(engine, method.split()[0], patcher, stack, **METHODS[method])
    return run_sampler(engine, guider)["samples"].float().cpu()


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_samples_the_same_under_dynamic_vram(engine, patchers, stack, state_dict, method):
    import comfy.model_management

    dynamic, classic = patchers
    base = sampled(engine, "base", classic, stack)
    expected = sampled(engine, method, classic, stack)
    got = sampled(engine, method, dynamic, stack)
    assert (expected - base).abs().max() > 1e-2, "the LoRAs change the classic result (else the check proves nothing)"
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    assert_no_hooks_left(dynamic)
    comfy.model_management.unload_all_models()
    for key, value in dynamic.model.diffusion_model.state_dict().items():
        assert torch.equal(value.cpu(), state_dict[key].cpu()), f"base weight {key} changed under dynamic VRAM"
