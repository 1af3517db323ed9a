"""Types and helpers the node modules share."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

import comfy.samplers
import nodes as comfy_nodes

from .. import loratorio_core as lc
from ..loratorio_comfy.adapters import check_strength
from ..loratorio_comfy.build import ROUTING_MODES

CATEGORY = "loratorio"
LORA_STACK = "LORA_STACK"
LORA_CONDITIONING = "LORA_CONDITIONING"
NO_LORA = "None"


class LoraStackEntry(NamedTuple):
    """One row of a ``LORA_STACK``, the list type other LoRA packs exchange."""

    lora_name: str
    model_strength: float
    clip_strength: float


class LoraStack(list):
    """A ``LORA_STACK`` that also carries the pack's per-LoRA step windows and regions, by LoRA
    name. Other packs see the plain list of ``(name, model, clip)`` rows they exchange; the
    windows and regions ride along."""

    def __init__(
        self,
        rows: Iterable[LoraStackEntry] = (),
        windows: Mapping[str, lc.StepWindow] | None = None,
        regions: Mapping[str, lc.Region] | None = None,
    ) -> None:
        super().__init__(rows)
        names = {row[0] for row in self}
        self.windows: dict[str, lc.StepWindow] = {name: w for name, w in (windows or {}).items() if name in names}
        self.regions: dict[str, lc.Region] = {name: r for name, r in (regions or {}).items() if name in names}


def as_lora_stack(value: object) -> LoraStack:
    """Validate a ``LORA_STACK`` from any pack: a list of ``(name, model, clip)`` triples."""
    if value is None:
        return LoraStack()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"LORA_STACK must be a list of (lora_name, model_strength, clip_strength), got {type(value).__name__}")
    entries = []
    for position, row in enumerate(value, start=1):
        if not isinstance(row, (list, tuple)) or len(row) != 3:
            raise ValueError(f"LORA_STACK row {position} is {row!r}; each row must be (lora_name, model_strength, clip_strength)")
        name, model_strength, clip_strength = row
        if not isinstance(name, str) or not name:
            raise ValueError(f"LORA_STACK row {position} has no LoRA file name: {row!r}")
        try:
            strengths = float(model_strength), float(clip_strength)
        except (TypeError, ValueError):
            raise ValueError(f"LORA_STACK row {position} has non-numeric strengths: {row!r}") from None
        entries.append(LoraStackEntry(name, *(check_strength(name, strength) for strength in strengths)))
    return LoraStack(entries, getattr(value, "windows", None), getattr(value, "regions", None))


def with_preview(images: object, result: tuple) -> dict:
    """A node result that also shows ``images`` on the node in the graph editor, saved as PreviewImage saves them."""
    return {"ui": comfy_nodes.PreviewImage().save_images(images, filename_prefix="loratorio-weightmaps")["ui"], "result": result}


def tip(text: str, **options: object) -> dict:
    return {"tooltip": text, **options}


def composition_inputs() -> dict[str, tuple]:
    """The inputs every composition node shares."""
    return {
        "model": ("MODEL", tip("The base diffusion model; its weights are never changed.")),
        "positive": ("CONDITIONING", tip("The prompt, encoded once with the base text encoder; every adapter sees it.")),
        "negative": ("CONDITIONING", tip("The negative prompt (unused at cfg 1, e.g. Flux-dev).")),
        "lora_stack": (LORA_STACK, tip("The LoRAs to compose, e.g. from Multi-LoRA Loader.")),
        "cfg": ("FLOAT", tip("Classifier-free guidance scale.", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01)),
    }


def adapter_prompt_inputs() -> dict[str, tuple]:
    """Optional per-adapter prompt encodings (from Multi-LoRA Text Encode)."""
    return {
        "adapter_positive": (LORA_CONDITIONING, tip("Optional: each adapter's own encoding of the prompt.")),
        "adapter_negative": (LORA_CONDITIONING, tip("Optional: each adapter's own encoding of the negative prompt.")),
    }


def loratorio_inputs() -> dict[str, tuple]:
    """LoRAtorio's open parameters, with the defaults of ``loratorio_core``."""
    return {
        "patch_size": (
            "INT",
            tip("Patch side in latent pixels (8 = 64 image pixels).", default=lc.DEFAULT_PATCH_SIZE, min=1, max=256),
        ),
        "temperature": (
            "FLOAT",
            tip(
                "SoftMin temperature T: lower routes harder, higher blends.",
                default=lc.DEFAULT_TEMPERATURE,
                min=0.0,
                max=100.0,
                step=0.005,
            ),
        ),
        "recentre_lambda": (
            "FLOAT",
            tip(
                "Weight of the base model's uncond in the re-centred uncond; 1 skips the adapters' unconds.",
                default=lc.DEFAULT_LAMBDA,
                min=0.0,
                max=1.0,
                step=0.05,
            ),
        ),
        "top_k": (
            "INT",
            tip("Dynamic pool: keep the k most divergent adapters per step; 0 keeps all.", default=0, min=0, max=64),
        ),
        "top_k_mode": (
            list(lc.TOP_K_MODES),
            tip("Rank adapters per image or separately in every patch.", default=lc.DEFAULT_TOP_K_MODE),
        ),
    }


def extension_inputs() -> dict[str, tuple]:
    """LoRAtorio's options beyond the paper: optional inputs, so workflows saved without them keep
    loading (as the paper: "fixed", "grid", "this step")."""
    return {
        "temperature_scaling": (
            list(lc.TEMPERATURE_SCALINGS),
            tip(
                "fixed: T as given (the paper). by LoRA count: T is for two LoRAs and is divided by log2 N for the N "
                "competing in a patch (after top_k and hard regions), so routing stays as sharp with more LoRAs. "
                "by LoRA count and noise level: also T * r^3 at noise-to-signal ratio r, blending while noise "
                "dominates and routing harder as the image forms.",
                default=lc.TEMPERATURE_SCALINGS[0],
            ),
        ),
        "patch_layout": (
            list(lc.PATCH_LAYOUTS),
            tip(
                "grid: the similarity is taken over a grid of patch_size patches (the paper). sliding: over a "
                "patch_size window around every latent pixel, so where one LoRA takes over from another follows "
                "the image, not the grid lines, and shapes are not cut square at patch edges.",
                default=lc.PATCH_LAYOUTS[0],
            ),
        ),
        "routing_memory": (
            list(lc.ROUTING_MEMORIES),
            tip(
                "this step: each step routes on its own similarities (the paper). steps so far: on the evidence of "
                "every step so far (each step's SoftMin multiplied in), so a LoRA's claim on a region has to hold up "
                "over the steps and does not flip from step to step late in the run.",
                default=lc.ROUTING_MEMORIES[0],
            ),
        ),
        "style_loras": (
            list(lc.STYLE_LORAS),
            tip(
                "routed: every LoRA competes for every patch (the paper). applied everywhere: a LoRA that changes the "
                "whole image alike (a style, a palette, a lighting) is found over the first two steps and from then on "
                "merged into every row, costing no rows of its own; the other LoRAs are routed among themselves, so "
                "a style no longer takes the edges of the subjects. LoRAs with a region mask always stay routed.",
                default=lc.STYLE_LORAS[0],
            ),
        ),
        "style_coverage": (
            "FLOAT",
            tip(
                "style_loras applied everywhere: a LoRA is a style when its change covers at least this share of "
                "the image alike (1 = every patch). The console names each LoRA taken as a style, with its share.",
                default=lc.DEFAULT_STYLE_COVERAGE,
                min=0.01,
                max=1.0,
                step=0.05,
            ),
        ),
    }


def routing_inputs() -> dict[str, tuple]:
    """LoRAtorio's single-pass routed mode (optional inputs: workflows saved without them keep loading)."""
    return {
        "routing": (
            list(ROUTING_MODES),
            tip(
                "every step: every LoRA's rows at every step (the paper). single pass: full steps build a routing map, "
                "the other steps run ONE row whose image tokens each get their routed LoRAs (2 rows, whatever N).",
                default=ROUTING_MODES[0],
            ),
        ),
        "full_steps": (
            "INT",
            tip(
                "single pass: the first steps that run every LoRA's rows; 0 takes the map from region masks alone "
                "(no full step at all).",
                default=lc.DEFAULT_FULL_STEPS,
                min=0,
            ),
        ),
        "refresh_every": (
            "INT",
            tip(
                "single pass: after the first full steps, every n-th step is full again and refreshes the map "
                "(0 = never: cheaper, but the first steps' map is nearly flat and composes weakly).",
                default=lc.DEFAULT_REFRESH_EVERY,
                min=0,
            ),
        ),
    }


def ksampler_inputs() -> dict[str, tuple]:
    """KSampler's own inputs, so the all-in-one samplers drop in where a KSampler was."""
    return {
        "seed": (
            "INT",
            tip("The random seed of the noise.", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
        ),
        "steps": ("INT", tip("Denoising steps.", default=20, min=1, max=10000)),
        "sampler_name": (comfy.samplers.SAMPLER_NAMES, tip("The sampling algorithm.")),
        "scheduler": (comfy.samplers.SCHEDULER_NAMES, tip("The noise schedule.")),
        "latent_image": ("LATENT", tip("The latent to denoise.")),
        "denoise": (
            "FLOAT",
            tip("How much of the latent to replace; below 1 keeps some of the input.", default=1.0, min=0.0, max=1.0, step=0.01),
        ),
    }
