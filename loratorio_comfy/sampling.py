"""Run a guider the way KSampler runs its CFG guider: same noise, sigmas, previews and progress."""

from __future__ import annotations

import inspect

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch

from .adapters import LoRAInputError


def ksampler_sigmas(model_patcher, steps: int, scheduler: str, denoise: float) -> torch.Tensor:
    """KSampler's sigmas for ``steps`` and ``denoise`` (computed by ComfyUI's own ``KSampler``)."""
    sampler = comfy.samplers.KSampler(
        model_patcher,
        steps=steps,
        device=model_patcher.load_device,
        scheduler=scheduler,
        denoise=denoise,
        model_options=model_patcher.model_options,
    )
    return sampler.sigmas


# Newer ComfyUI's EmptyLatentImage records the image-to-latent scale it assumed (8); KSampler
# resizes an empty latent for families whose VAE scales differently. 0.3.75 has neither.
LATENT_SCALE_KEYS = ("downscale_ratio_spacial", "downscale_ratio_temporal")


def _latent_scale_arguments(latent: dict) -> dict:
    accepted = inspect.signature(comfy.sample.fix_empty_latent_channels).parameters
    return {key: latent.get(key) for key in LATENT_SCALE_KEYS if key in accepted}


def sample_latent(
    guider: comfy.samplers.CFGGuider,
    latent: dict,
    seed: int,
    steps: int,
    sampler_name: str,
    scheduler: str,
    denoise: float,
) -> dict:
    """Sample ``latent`` with ``guider`` exactly as ``common_ksampler`` does with its CFG guider."""
    if not 0.0 <= denoise <= 1.0:  # NaN too: the HTTP API accepts it, ComfyUI's range check does not catch it
        raise LoRAInputError(
            f"denoise is {denoise}; use a number from 0 to 1 (1 starts from pure noise, less keeps more of the latent)"
        )
    model_patcher = guider.model_patcher
    latent_image = comfy.sample.fix_empty_latent_channels(model_patcher, latent["samples"], **_latent_scale_arguments(latent))
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    sigmas = ksampler_sigmas(model_patcher, steps, scheduler, denoise)
    callback = latent_preview.prepare_callback(model_patcher, sigmas.shape[-1] - 1)
    samples = guider.sample(
        noise,
        latent_image,
        comfy.samplers.sampler_object(sampler_name),
        sigmas,
        denoise_mask=latent.get("noise_mask"),
        callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
        seed=seed,
    )
    out = {key: value for key, value in latent.items() if key not in LATENT_SCALE_KEYS}
    out["samples"] = samples.to(comfy.model_management.intermediate_device())
    return out
