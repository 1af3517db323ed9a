"""Per-adapter prompt encoding: the prompt encoded once per LoRA with that LoRA's text-encoder weights.

The default of the composition nodes is different: every adapter row sees the base encoding of
the prompt. That keeps LoRAtorio's routing signal about the diffusion model (each adapter's
prediction against the base's under the same conditioning), costs no extra text-encoder pass and
matches LoRAs that train the diffusion model only (most SDXL, SD3 and Flux LoRAs). Use this
encoding for LoRAs whose trigger words only work through their own text-encoder weights.
"""

from __future__ import annotations

import comfy.sd

from .adapter_set import lora_path
from .adapters import LORA_FILES, check_strength, text_encoder_part


def encode_per_adapter(clip, text: str, lora_stack) -> list:
    """One CONDITIONING per LoRA of the stack, in order: ``text`` through CLIP + that LoRA's CLIP weights."""
    base = None
    encodings = []
    for name, _, clip_strength in lora_stack:
        clip_strength = check_strength(name, clip_strength)
        patched = clip
        if clip_strength != 0:
            # only the text-encoder tensors: the rest would each log "lora key not loaded"
            state = text_encoder_part(LORA_FILES.load(lora_path(name), name))
            if state:
                _, patched = comfy.sd.load_lora_for_models(None, clip, state, 0.0, clip_strength)
        if patched is clip or not patched.patcher.patches:
            if base is None:
                base = clip.encode_from_tokens_scheduled(clip.tokenize(text))
            encodings.append(base)
        else:
            encodings.append(patched.encode_from_tokens_scheduled(patched.tokenize(text)))
    return encodings
