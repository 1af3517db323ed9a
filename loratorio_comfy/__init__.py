"""The ComfyUI layer: LoRA files read through ComfyUI's parser, per-row LoRA hooks, guiders."""
