"""Helpers shared by the engine tests: conditioning, guiders, sampling, counting and weight checks."""

from __future__ import annotations

import torch

from .tiny_models import conditioning, latent, timesteps

STEPS = 3


def comfy_conditioning(family: str, seed: int = 1) -> list:
    kwargs = conditioning(family, seed=seed)
    extra = {}
    if "y" in kwargs:
        extra["pooled_output"] = kwargs["y"][:, :1280] if family == "sdxl" else kwargs["y"]
    if family == "flux":
        extra["guidance"] = 3.5
    return [[kwargs["c_crossattn"], extra]]


def snapshot(patcher) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}


def assert_same_weights(patcher, before: dict[str, torch.Tensor]) -> None:
    after = patcher.model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"base weight {key} changed"
    assert_no_hooks_left(patcher)


def assert_no_hooks_left(patcher) -> None:
    """The per-row hooks live for one model call: none may outlast it."""
    hooked = [n for n, m in patcher.model.named_modules() if m._forward_hooks]
    assert not hooked, f"forward hooks left on {hooked[:3]}"


class ForwardCounter:
    """Counts the diffusion model's forwards and the rows of each (a forward pre-hook)."""

    def __init__(self, patcher) -> None:
        self.rows: list[int] = []
        self.handle = patcher.model.diffusion_model.register_forward_pre_hook(
            lambda _module, args: self.rows.append(args[0].shape[0])
        )

    def __enter__(self) -> ForwardCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def run_sampler(
    engine, guider, latent_dict: dict | None = None, sampler: str = "euler", steps: int = STEPS, denoise: float = 1.0
):
    latent_dict = latent_dict or {"samples": torch.zeros(1, 4, 16, 16)}
    return engine.sampling.sample_latent(
        guider, latent_dict, seed=3, steps=steps, sampler_name=sampler, scheduler="normal", denoise=denoise
    )


def make_guider(engine, method: str, patcher, stack, cfg: float = 5.0, **options):
    positive = comfy_conditioning("sd15")
    negative = comfy_conditioning("sd15", seed=9)
    if method == "loratorio":
        params = {"patch_size": 4, "temperature": 0.05, "recentre_lambda": 0.5, "top_k": 0, "top_k_mode": "image", **options}
        return engine.build.loratorio_guider(patcher, positive, negative, stack, cfg, **params)
    if method == "composite":
        return engine.build.composite_guider(patcher, positive, negative, stack, cfg)
    return engine.build.switch_guider(patcher, positive, negative, stack, cfg, options.get("tau", 2))


def adapter_row_prediction(engine, patcher, family: str, name: str, strength: float) -> torch.Tensor:
    """One forward whose single row carries the LoRA file ``name`` at ``strength``, through the APPLY_MODEL wrapper."""
    import comfy.model_management
    import comfy.patcher_extension

    adapters = engine.adapter_set.AdapterSet(patcher, [(name, strength)])
    comfy.model_management.load_models_gpu([patcher])  # as sampling does: this patcher's weights, not another clone's
    with engine.row_lora.row_layers_registered(adapters.row_layers) as run_id:
        plan = {"run": run_id, "rows": (0,), "kinds": (0,)}
        options = {engine.row_lora.ROW_MAP_KEY: plan, "cond_or_uncond": [0]}
        comfy.patcher_extension.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.APPLY_MODEL, "loratorio", engine.row_lora.apply_model_with_rows, options
        )
        with torch.no_grad():
            return patcher.model.apply_model(latent(family), timesteps(2.0), transformer_options=options, **conditioning(family))


def merged_prediction(patcher, family: str, lora: dict, strength: float) -> torch.Tensor:
    """One forward of ComfyUI's own LoRA merge (what LoraLoader does) of ``lora`` (a state dict) at ``strength``."""
    return merged_stack_prediction(patcher, family, [(lora, strength)])


def merged_stack_prediction(patcher, family: str, loras: list[tuple[dict, float]]) -> torch.Tensor:
    """One forward of ComfyUI's own LoRA merges, one after another (chained LoraLoaders), of ``loras``."""
    import comfy.model_management
    import comfy.sd

    merged = patcher
    for lora, strength in loras:
        merged, _ = comfy.sd.load_lora_for_models(merged, None, lora, strength, 0.0)
    comfy.model_management.load_models_gpu([merged])
    with torch.no_grad():
        out = merged.model.apply_model(latent(family), timesteps(2.0), **conditioning(family))
    comfy.model_management.unload_all_models()
    return out


def row_predictions(
    engine, patcher, family: str, adapters, row_map: tuple[int, ...], routing=None, everywhere: tuple[int, ...] = ()
) -> list[torch.Tensor]:
    """One forward whose rows carry the adapters of ``row_map`` (-1 = base, -2 = routed by ``routing``
    ``[1, N, H, W]``), and every unrouted row those of ``everywhere``, through the APPLY_MODEL wrapper."""
    import comfy.model_management
    import comfy.patcher_extension

    rows = len(row_map)
    comfy.model_management.load_models_gpu([patcher])  # as sampling does: this patcher's weights, not another clone's
    with engine.row_lora.row_layers_registered(adapters.row_layers) as run_id:
        if routing is not None:
            engine.row_lora.set_routing(run_id, routing)
        row_plan = {
            "run": run_id,
            "rows": row_map,
            "kinds": (0,) * rows,
            "everywhere": everywhere,
        }
        options = {engine.row_lora.ROW_MAP_KEY: row_plan, "cond_or_uncond": list(range(rows))}
        comfy.patcher_extension.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.APPLY_MODEL, "loratorio", engine.row_lora.apply_model_with_rows, options
        )
        kwargs = {k: v.repeat(rows, *([1] * (v.ndim - 1))) for k, v in conditioning(family).items()}
        x = latent(family).repeat(rows, 1, 1, 1)
        with torch.no_grad():
            out = patcher.model.apply_model(x, timesteps(*[2.0] * rows), transformer_options=options, **kwargs)
    assert_no_hooks_left(patcher)
    return list(out.chunk(rows))
