"""The per-row LoRA engine and the guiders inside real ComfyUI sampling (tiny models, CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.utils
import nodes as comfy_nodes
import pytest
import torch

import loratorio_core as lc
from support.engine_helpers import (
    STEPS,
    ForwardCounter,
    assert_no_hooks_left,
    assert_same_weights,
    comfy_conditioning,
    make_guider,
    merged_prediction,
    merged_stack_prediction,
    row_predictions,
    run_sampler,
    snapshot,
)
from support.lora_files import KEY_STYLES, LYCORIS_KINDS, write_lora, write_lycoris, write_peft
from support.tiny_models import FAMILIES, batch_tolerance, conditioning, latent, merge_tolerance, timesteps


@pytest.mark.parametrize("style", KEY_STYLES)
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_rows_equal_comfyui_merged_lora(engine, family, style, tiny_model_factory, loras_folder):
    patcher = tiny_model_factory(family)
    files = [write_lora(loras_folder / f"{style}{i}.safetensors", family, patcher.model, style, seed=i) for i in range(2)]
    strengths = (0.7, -1.3)
    adapters = engine.adapter_set.AdapterSet(patcher, [(f.name, s) for f, s in zip(files, strengths, strict=True)])
    base, first, second = row_predictions(engine, patcher, family, adapters, (-1, 0, 1))
    with torch.no_grad():
        plain = patcher.model.apply_model(latent(family), timesteps(2.0), **conditioning(family))
    torch.testing.assert_close(base, plain, rtol=batch_tolerance(), atol=batch_tolerance())
    tolerance = merge_tolerance()
    for row, lora_file, strength in ((first, files[0], strengths[0]), (second, files[1], strengths[1])):
        expected = merged_prediction(patcher, family, comfy.utils.load_torch_file(str(lora_file), safe_load=True), strength)
        assert not torch.allclose(expected, plain, atol=1e-3)
        torch.testing.assert_close(row, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_loras_applied_everywhere_are_merged_into_every_unrouted_row(engine, family, tiny_model_factory, loras_folder):
    """Style LoRAs applied everywhere: each unrouted row is its own LoRA's row of a model with the
    styles merged in (ComfyUI's own merge; low-rank deltas, and a dense one on SD1.5), and a routed
    row is left to its routing map."""
    patcher = tiny_model_factory(family)
    subject = write_lora(loras_folder / "subject.safetensors", family, patcher.model, "peft", seed=1)
    style = write_lora(loras_folder / "style.safetensors", family, patcher.model, "kohya", seed=2)
    if family == "sd15":
        dense = write_lycoris(loras_folder / "dense-style.safetensors", family, patcher.model, "full", seed=3)
    else:  # the LyCORIS writer's keys are the UNets'
        dense = write_lora(loras_folder / "dense-style.safetensors", family, patcher.model, "comfy", seed=3)
    files = (subject, style, dense)
    adapters = engine.adapter_set.AdapterSet(patcher, [(f.name, 1.0) for f in files])
    state = [comfy.utils.load_torch_file(str(f), safe_load=True) for f in files]
    if family == "sd15":  # the style's convolution deltas ride on every row too
        layers = adapters.row_layers.layers.values()
        assert any(g.down.ndim == 5 and 1 in g.adapters for layer in layers for g in layer.low_rank)
    base_row, subject_row = row_predictions(engine, patcher, family, adapters, (-1, 0), everywhere=(1, 2))
    tolerance = merge_tolerance()
    for row, merged in ((base_row, [1, 2]), (subject_row, [0, 1, 2])):
        expected = merged_stack_prediction(patcher, family, [(state[i], 1.0) for i in merged])
        torch.testing.assert_close(row, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
    height, width = latent(family).shape[-2:]
    routing = torch.zeros(1, 3, height, width)
    routing[:, 0, :, : width // 2] = 1.0
    alone = row_predictions(engine, patcher, family, adapters, (-2, -1), routing=routing)
    with_styles = row_predictions(engine, patcher, family, adapters, (-2, -1), routing=routing, everywhere=(1, 2))
    torch.testing.assert_close(with_styles[0], alone[0], rtol=0, atol=0)
    expected = merged_stack_prediction(patcher, family, [(state[1], 1.0), (state[2], 1.0)])
    torch.testing.assert_close(with_styles[1], expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


@pytest.fixture
def sd15_stack(tiny_model_factory, loras_folder):
    model = tiny_model_factory("sd15").model
    names = []
    for i, style in enumerate(("kohya", "peft", "comfy", "kohya")):
        names.append(write_lora(loras_folder / f"{style}_{i}.safetensors", "sd15", model, style, seed=10 + i).name)
    return [(name, 1.0, 1.0) for name in names]


@pytest.mark.parametrize(
    ("method", "options", "rows_per_step"),
    [
        ("loratorio", {"recentre_lambda": 1.0}, 2 + 3),
        ("loratorio", {"recentre_lambda": 0.5}, 2 + 2 * 3),
        ("loratorio", {"recentre_lambda": 0.5, "top_k": 2}, 2 + 2 * 3),
        ("composite", {}, 2 * 3),
        ("switch", {"tau": 1}, 2),
    ],
)
def test_one_forward_per_step_with_the_rows_the_math_needs(
    engine, tiny_model_factory, sd15_stack, method, options, rows_per_step
):
    patcher = tiny_model_factory("sd15")
    guider = make_guider(engine, method, patcher, sd15_stack[:3], cfg=5.0, **options)
    with ForwardCounter(patcher) as counter:
        run_sampler(engine, guider)
    assert counter.rows == [rows_per_step] * STEPS


def test_cfg_one_evaluates_no_uncond_rows(engine, tiny_model_factory, sd15_stack):
    patcher = tiny_model_factory("sd15")
    guider = make_guider(engine, "loratorio", patcher, sd15_stack[:3], cfg=1.0, recentre_lambda=0.5)
    with ForwardCounter(patcher) as counter:
        run_sampler(engine, guider)
    assert counter.rows == [1 + 3] * STEPS


def plain_ksampler(patcher) -> torch.Tensor:
    (out,) = comfy_nodes.common_ksampler(
        patcher,
        3,
        STEPS,
        5.0,
        "euler",
        "normal",
        comfy_conditioning("sd15"),
        comfy_conditioning("sd15", seed=9),
        {"samples": torch.zeros(1, 4, 16, 16)},
    )
    return out["samples"]


def test_base_model_untouched_by_a_run_and_plain_ksampler_bit_identical(engine, tiny_model_factory, sd15_stack):
    patcher = tiny_model_factory("sd15")
    weights = snapshot(patcher)
    before = plain_ksampler(patcher)
    composed = run_sampler(engine, make_guider(engine, "loratorio", patcher, sd15_stack))["samples"]
    assert torch.isfinite(composed).all() and not torch.equal(composed, before)
    assert_same_weights(patcher, weights)
    assert torch.equal(plain_ksampler(patcher), before)


def test_base_model_untouched_after_an_exception_inside_a_forward(engine, tiny_model_factory, sd15_stack):
    patcher = tiny_model_factory("sd15")
    weights = snapshot(patcher)
    calls = []

    def explode(_module, _args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("forward failed on purpose")

    handle = patcher.model.diffusion_model.input_blocks[1][0].register_forward_pre_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="on purpose"):
            run_sampler(engine, make_guider(engine, "loratorio", patcher, sd15_stack))
    finally:
        handle.remove()
    assert_same_weights(patcher, weights)


def test_base_model_untouched_after_an_interrupt(engine, tiny_model_factory, sd15_stack):
    patcher = tiny_model_factory("sd15")
    weights = snapshot(patcher)
    before = plain_ksampler(patcher)
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_sampler(engine, make_guider(engine, "composite", patcher, sd15_stack))
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert_same_weights(patcher, weights)
    assert torch.equal(plain_ksampler(patcher), before)


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "heun", "uni_pc", "euler_cfg_pp"])
def test_every_sampler_family_runs(engine, tiny_model_factory, sd15_stack, sampler):
    patcher = tiny_model_factory("sd15")
    guider = make_guider(engine, "loratorio", patcher, sd15_stack[:2])
    out = run_sampler(engine, guider, sampler=sampler, steps=4)["samples"]
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()
    assert len(guider.weight_history) == 4  # one map per step, however often the sampler evaluates


def test_switch_changes_adapter_at_the_right_steps_under_heun(engine, tiny_model_factory, sd15_stack):
    patcher = tiny_model_factory("sd15")
    guider = make_guider(engine, "switch", patcher, sd15_stack[:2], tau=2)
    evaluated: list[tuple[float, set[int]]] = []  # (sigma, adapters of the rows) per model evaluation
    evaluate = guider.evaluate

    def recording(rows, x, timestep, model_options):
        evaluated.append((float(timestep.flatten()[0]), {adapter for _, adapter in rows}))
        return evaluate(rows, x, timestep, model_options)

    guider.evaluate = recording
    run_sampler(engine, guider, sampler="heun", steps=6)
    sigmas = engine.sampling.ksampler_sigmas(patcher, 6, "normal", 1.0).tolist()
    assert len(evaluated) == 2 * 6 - 1  # heun: two evaluations per step, one on the last
    first_per_step: dict[int, int] = {}
    for sigma, adapters in evaluated:
        assert len(adapters) == 1, "cond and uncond rows use the same adapter"
        step = lc.step_index(sigma, sigmas)
        first_per_step.setdefault(step, adapters.pop())
    assert [first_per_step[i] for i in range(6)] == [0, 0, 1, 1, 0, 0]


def test_batches_denoise_and_inpainting_mask(engine, tiny_model_factory, sd15_stack):
    patcher = tiny_model_factory("sd15")
    source = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, :, 8:] = 1.0
    guider = make_guider(engine, "loratorio", patcher, sd15_stack[:2])
    with ForwardCounter(patcher) as counter:
        out = run_sampler(engine, guider, {"samples": source.clone(), "noise_mask": mask}, denoise=0.5, steps=4)["samples"]
    assert counter.rows == [2 * (2 + 2 * 2)] * 4  # each of the 6 rows carries the batch of 2
    assert out.shape == source.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :, :, :8], source[:, :, :, :8])  # the kept region is the input latent
    assert not torch.allclose(out[:, :, :, 8:], source[:, :, :, 8:])
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_loratorio_samples_every_family(engine, family, tiny_model_factory, loras_folder):
    patcher = tiny_model_factory(family)
    names = [write_lora(loras_folder / f"{family}{i}.safetensors", family, patcher.model, style, seed=i).name
             for i, style in enumerate(("kohya", "peft"))]  # fmt: skip
    cfg = 1.0 if family == "flux" else 4.0  # Flux-dev is guidance-distilled: cfg 1, no uncond rows
    params = {"patch_size": 2, "temperature": 0.05, "recentre_lambda": 0.5, "top_k": 0, "top_k_mode": "image"}
    guider = engine.build.loratorio_guider(
        patcher, comfy_conditioning(family), comfy_conditioning(family, seed=9), [(n, 1.0, 1.0) for n in names], cfg, **params
    )
    channels = 16 if family in ("sd3", "flux") else 4
    with ForwardCounter(patcher) as counter:
        out = run_sampler(engine, guider, {"samples": torch.zeros(1, channels, 16, 16)})["samples"]
    assert torch.isfinite(out).all() and out.std() > 0
    assert counter.rows == [(1 + 2) if family == "flux" else (2 + 2 * 2)] * STEPS
    assert guider.weight_history.maps().shape == (STEPS, 2, 16, 16)


def test_loratorio_sampler_node_outputs_weight_maps_with_a_legend(pack, tiny_model_factory, sd15_stack):
    node = pack.NODE_CLASS_MAPPINGS["LoRAtorioSampler"]()
    output = node.sample(
        tiny_model_factory("sd15"), comfy_conditioning("sd15"), comfy_conditioning("sd15", seed=9), sd15_stack[:3], 5.0,
        {"samples": torch.zeros(1, 4, 16, 16)}, seed=1, steps=STEPS, sampler_name="euler", scheduler="normal", denoise=1.0,
        patch_size=4, temperature=0.05, recentre_lambda=1.0, top_k=2, top_k_mode="patch",
    )  # fmt: skip
    latent, image = output["result"]
    assert_shown_on_node(output, image)
    assert latent["samples"].shape == (1, 4, 16, 16)
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    from comfyui_loratorio.loratorio_comfy import weight_map_image as wmi

    tile = wmi.TILE_PIXELS
    assert image.shape[2] == STEPS * (tile + wmi.TILE_GAP) - wmi.TILE_GAP  # one tile per step above the legend
    assert image.shape[1] == wmi.legend_top(tile) - 4 + wmi.LEGEND_ROW * 4
    assert image.min() >= 0.0 and image.max() <= 1.0 and image.std() > 0.05
    palette = pack.loratorio_core.adapter_palette(3)
    legend_swatches = [image[0, wmi.legend_top(tile) + wmi.LEGEND_ROW * i + 6, 10] for i in range(3)]
    for swatch, colour in zip(legend_swatches, palette, strict=True):
        torch.testing.assert_close(swatch, colour, atol=1 / 255, rtol=0)


def assert_shown_on_node(output: dict, image: torch.Tensor) -> None:
    """The node's ``ui`` lists the image as a temp-folder preview the graph editor can show on the node."""
    import folder_paths
    from PIL import Image

    (preview,) = output["ui"]["images"]
    assert preview["type"] == "temp"
    with Image.open(Path(folder_paths.get_temp_directory()) / preview["subfolder"] / preview["filename"]) as saved:
        assert saved.size == (image.shape[2], image.shape[1])


def ksampler_on(patcher, cfg: float = 5.0) -> torch.Tensor:
    (out,) = comfy_nodes.common_ksampler(
        patcher, 3, STEPS, cfg, "euler", "normal", comfy_conditioning("sd15"), comfy_conditioning("sd15", seed=9),
        {"samples": torch.zeros(1, 4, 16, 16)},
    )  # fmt: skip
    return out["samples"]


def write_any(folder: Path, style: str, model, seed: int) -> Path:
    path = folder / f"one_{style}.safetensors"
    if style in LYCORIS_KINDS:
        return write_lycoris(path, "sd15", model, style, seed=seed)
    return write_lora(path, "sd15", model, style, seed=seed)


@pytest.mark.parametrize("style", ["kohya", "loha", *LYCORIS_KINDS])
def test_composite_of_one_adapter_equals_ksampler_on_the_merged_model(engine, tiny_model_factory, loras_folder, style, caplog):
    """End to end: one adapter of each type through our guider (low-rank rows for LoRA, exact dense
    rows for LoKr, OFT, DoRA and full diffs; LoHa in either form) equals ComfyUI's own LoraLoader + KSampler."""
    patcher = tiny_model_factory("sd15")
    lora_file = write_any(loras_folder, style, patcher.model, seed=3)
    (merged,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, lora_file.name, 0.8)
    expected = ksampler_on(merged)
    with caplog.at_level("INFO"):
        guider = make_guider(engine, "composite", patcher, [(lora_file.name, 0.8, 0.8)])
    assert ("exact dense deltas" in caplog.text) == (style != "kohya")
    got = run_sampler(engine, guider)["samples"]
    tolerance = merge_tolerance(on_cpu=1e-4)
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
    assert not torch.allclose(got, ksampler_on(patcher), atol=1e-3)


def test_no_adapter_type_reaches_comfyui_hooks(engine, tiny_model_factory, sd15_stack, loras_folder, monkeypatch):
    """Newer ComfyUI reloads the model when a cond carries hooks (dynamic VRAM): every adapter type,
    mixed with plain LoRAs, runs in ONE batched forward per step with no hook on any cond."""
    import comfy.hooks

    def refuse(*args, **kwargs):
        raise AssertionError("the pack must not use ComfyUI's hooks")

    for name in ("create_hook_lora", "set_hooks_for_conditioning", "create_hook_model_as_lora"):
        monkeypatch.setattr(comfy.hooks, name, refuse)
    patcher = tiny_model_factory("sd15")
    weights = snapshot(patcher)
    dense = [write_any(loras_folder, kind, patcher.model, seed=7 + i).name for i, kind in enumerate(("loha", "dora"))]
    stack = [*sd15_stack[:2], *((name, 1.0, 1.0) for name in dense)]
    guider = make_guider(engine, "loratorio", patcher, stack, recentre_lambda=0.5)
    assert not any("hooks" in cond for conds in guider.original_conds.values() for cond in conds)
    with ForwardCounter(patcher) as counter:
        out = run_sampler(engine, guider)["samples"]
    assert torch.isfinite(out).all()
    assert counter.rows == [2 + 2 * len(stack)] * STEPS, "one forward per step: base and every adapter, cond + uncond"
    assert_same_weights(patcher, weights)
    assert_no_hooks_left(patcher)


def test_memory_is_reserved_for_the_real_row_count(engine, tiny_model_factory, sd15_stack, monkeypatch):
    import comfy.sampler_helpers

    seen_rows = []
    original = comfy.sampler_helpers.estimate_memory

    def recording(model, noise_shape, conds):
        seen_rows.append(noise_shape[0] * 2)  # ComfyUI estimates for 2 x the noise batch
        return original(model, noise_shape, conds)

    monkeypatch.setattr(comfy.sampler_helpers, "estimate_memory", recording)
    patcher = tiny_model_factory("sd15")
    guider = make_guider(engine, "loratorio", patcher, sd15_stack[:3], recentre_lambda=0.5)
    run_sampler(engine, guider, {"samples": torch.zeros(3, 4, 16, 16)})
    activation_rows = 3 * (2 + 2 * 3)
    delta_bytes = guider.adapters.row_layers.numel() * 4  # float32 on the CPU
    row_bytes = patcher.model.memory_required([1, 4, 16, 16])
    (reserved,) = seen_rows
    assert (reserved - activation_rows) * row_bytes >= delta_bytes, "the deltas' memory is reserved too"
    assert (reserved - activation_rows - 2) * row_bytes < delta_bytes, "and not much more"
    seen_rows.clear()
    plain_ksampler(patcher)
    assert seen_rows == [2]


def test_weight_maps_node_reads_a_guider_after_sampler_custom_advanced(pack, tiny_model_factory, sd15_stack):
    from comfy_extras.nodes_custom_sampler import SamplerCustomAdvanced

    guider_node = pack.NODE_CLASS_MAPPINGS["LoRAtorioGuider"]()
    maps_node = pack.NODE_CLASS_MAPPINGS["LoRAtorioWeightMaps"]()
    (guider,) = guider_node.get_guider(
        tiny_model_factory("sd15"), comfy_conditioning("sd15"), comfy_conditioning("sd15", seed=9), sd15_stack[:2], 5.0,
        patch_size=4, temperature=0.05, recentre_lambda=0.5, top_k=0, top_k_mode="image",
    )  # fmt: skip
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    with pytest.raises(ValueError, match="has not sampled yet"):
        maps_node.render(guider, latent)
    noise = comfy_nodes_noise(seed=2)
    sampler = comfy.samplers.sampler_object("dpmpp_2m")
    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "karras", STEPS)
    output = SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent)
    shown = maps_node.render(guider, output.result[0])
    (image,) = shown["result"]
    assert_shown_on_node(shown, image)
    assert image.shape[0] == 1 and image.shape[-1] == 3 and image.std() > 0.05
    assert len(guider.weight_history) == STEPS
    with pytest.raises(ValueError, match="from a LoRAtorio Guider"):
        maps_node.render(comfy.samplers.CFGGuider(tiny_model_factory("sd15")), latent)


def test_weight_maps_node_after_a_run_with_no_step_shows_the_legend(pack, tiny_model_factory, sd15_stack):
    """Empty sigmas (BasicScheduler at denoise 0) leave the latent as it was; the maps node then shows the
    legend alone, as the LoRAtorio Sampler does at denoise 0, instead of claiming the guider never sampled."""
    from comfy_extras.nodes_custom_sampler import SamplerCustomAdvanced

    (guider,) = pack.NODE_CLASS_MAPPINGS["LoRAtorioGuider"]().get_guider(
        tiny_model_factory("sd15"), comfy_conditioning("sd15"), comfy_conditioning("sd15", seed=9), sd15_stack[:2], 5.0,
        patch_size=4, temperature=0.05, recentre_lambda=0.5, top_k=0, top_k_mode="image",
    )  # fmt: skip
    latent = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))}
    output = SamplerCustomAdvanced.execute(
        comfy_nodes_noise(seed=2), guider, comfy.samplers.sampler_object("euler"), torch.FloatTensor([]), latent
    )
    torch.testing.assert_close(output.result[0]["samples"], latent["samples"])
    (image,) = pack.NODE_CLASS_MAPPINGS["LoRAtorioWeightMaps"]().render(guider, output.result[0])["result"]
    assert len(guider.weight_history) == 0
    assert image.shape[0] == 1 and image.shape[-1] == 3 and image.std() > 0.05  # the legend's names and swatches


def test_temperature_scaled_by_lora_count_is_the_fixed_one_at_t_over_log2_n(pack, engine, tiny_model_factory, sd15_stack):
    patcher = tiny_model_factory("sd15")
    optional = pack.NODE_CLASS_MAPPINGS["LoRAtorioSampler"].INPUT_TYPES()["optional"]
    assert optional["temperature_scaling"][1]["default"] == "fixed", "the paper's fixed T unless asked"
    scaled = make_guider(engine, "loratorio", patcher, sd15_stack[:3], temperature=0.05, temperature_scaling="by LoRA count")
    fixed = make_guider(engine, "loratorio", patcher, sd15_stack[:3], temperature=0.05 * math.log(2) / math.log(3))
    # equal up to float32 rounding: the scaling multiplies the cosines by log2 3 instead of dividing T
    scaled_samples, fixed_samples = run_sampler(engine, scaled)["samples"], run_sampler(engine, fixed)["samples"]
    torch.testing.assert_close(scaled_samples, fixed_samples, atol=1e-3, rtol=1e-5)
    as_given = run_sampler(engine, make_guider(engine, "loratorio", patcher, sd15_stack[:3], temperature=0.05))["samples"]
    assert not torch.allclose(scaled_samples, as_given, atol=1e-2)


@pytest.mark.parametrize(("family", "sigma", "ratio"), [("sd15", 2.0, 2.0), ("sd3", 0.75, 3.0), ("flux", 0.5, 1.0)])
def test_noise_level_is_the_noise_to_signal_ratio_of_the_model_s_own_noising(engine, tiny_model_factory, family, sigma, ratio):
    sampling = tiny_model_factory(family).get_model_object("model_sampling")
    assert math.isclose(engine.guiders.noise_to_signal_ratio(sampling, torch.tensor([sigma])), ratio, rel_tol=1e-6)


def test_temperature_by_lora_count_and_noise_level_routes_by_each_step_s_sigma(pack, engine, tiny_model_factory, sd15_stack):
    patcher = tiny_model_factory("sd15")
    by_noise = make_guider(engine, "loratorio", patcher, sd15_stack[:3], temperature_scaling="by LoRA count and noise level")
    by_count = make_guider(engine, "loratorio", patcher, sd15_stack[:3], temperature_scaling="by LoRA count")
    noisy, counted = run_sampler(engine, by_noise)["samples"], run_sampler(engine, by_count)["samples"]
    assert torch.isfinite(noisy).all() and not torch.allclose(noisy, counted, atol=1e-2)
    maps = by_noise.weight_history.maps()
    first, last = maps[0], maps[-1]
    assert first.amax() < last.amax()  # near the plain mean at high noise, harder routing at the end
    options = pack.NODE_CLASS_MAPPINGS["LoRAtorioGuider"].INPUT_TYPES()["optional"]["temperature_scaling"][0]
    assert "by LoRA count and noise level" in options


def test_sliding_patch_layout_routes_every_pixel_by_its_own_window(pack, engine, tiny_model_factory, sd15_stack):
    patcher = tiny_model_factory("sd15")
    for node in ("LoRAtorioSampler", "LoRAtorioGuider"):
        assert pack.NODE_CLASS_MAPPINGS[node].INPUT_TYPES()["optional"]["patch_layout"][1]["default"] == "grid"

    def spread_within_patches(guider) -> float:
        maps = guider.weight_history.maps()
        blocks = maps.reshape(-1, 4, 4, 4, 4)  # 16x16 latent: [maps, patch row, pixel row, patch column, pixel column]
        return float((blocks.amax(dim=(2, 4)) - blocks.amin(dim=(2, 4))).max())

    for routing in ("every step", "single pass"):
        grid = make_guider(engine, "loratorio", patcher, sd15_stack[:3], routing=routing)
        sliding = make_guider(engine, "loratorio", patcher, sd15_stack[:3], routing=routing, patch_layout="sliding")
        grid_samples, sliding_samples = run_sampler(engine, grid)["samples"], run_sampler(engine, sliding)["samples"]
        assert torch.isfinite(sliding_samples).all() and not torch.allclose(grid_samples, sliding_samples, atol=1e-3)
        assert spread_within_patches(grid) == 0.0  # one weight per patch of 4x4 pixels
        assert spread_within_patches(sliding) > 0.05, routing  # a weight per pixel


def test_routing_memory_starts_as_the_paper_then_routes_on_every_step_so_far(pack, engine, tiny_model_factory, sd15_stack):
    patcher = tiny_model_factory("sd15")
    for node in ("LoRAtorioSampler", "LoRAtorioGuider"):
        assert pack.NODE_CLASS_MAPPINGS[node].INPUT_TYPES()["optional"]["routing_memory"][1]["default"] == "this step"
    (late_third,) = pack.NODE_CLASS_MAPPINGS["LoRAtorioStepWindow"]().set_window(sd15_stack[:3], 3, 0.5, 1.0)
    for routing in ("every step", "single pass"):
        paper = make_guider(engine, "loratorio", patcher, late_third, routing=routing)
        memory = make_guider(engine, "loratorio", patcher, late_third, routing=routing, routing_memory="steps so far")
        paper_samples, memory_samples = run_sampler(engine, paper)["samples"], run_sampler(engine, memory)["samples"]
        assert torch.isfinite(memory_samples).all() and not torch.allclose(paper_samples, memory_samples, atol=1e-3)
        paper_maps, memory_maps = paper.weight_history.maps(), memory.weight_history.maps()
        torch.testing.assert_close(memory_maps[0], paper_maps[0])  # nothing to remember at the first step
        torch.testing.assert_close(memory_maps.sum(dim=1), torch.ones_like(memory_maps[:, 0]))
        assert memory_maps[:, 2].amax() > 0.05, routing  # the LoRA that joined half-way gets its share
        again = run_sampler(engine, memory)["samples"]  # a new run starts with no evidence
        torch.testing.assert_close(again, memory_samples, rtol=0, atol=0)


def test_style_loras_applied_everywhere_leave_the_routing_for_the_run(
    pack, engine, tiny_model_factory, sd15_stack, monkeypatch, caplog
):
    patcher = tiny_model_factory("sd15")
    for node in ("LoRAtorioSampler", "LoRAtorioGuider"):
        assert pack.NODE_CLASS_MAPPINGS[node].INPUT_TYPES()["optional"]["style_loras"][1]["default"] == "routed"
    measured = []
    real_coverage = engine.guiders.lc.delta_coverage

    def recorded(*args, **kwargs):
        measured.append(real_coverage(*args, **kwargs).tolist())
        return torch.tensor(measured[-1])

    monkeypatch.setattr(engine.guiders.lc, "delta_coverage", recorded)
    stack = sd15_stack[:3]
    styles_only_if_whole = make_guider(engine, "loratorio", patcher, stack, style_loras="applied everywhere", style_coverage=1.0)
    routed = make_guider(engine, "loratorio", patcher, stack)
    samples = run_sampler(engine, styles_only_if_whole)["samples"]
    assert len(measured) == engine.guiders.lc.STYLE_JUDGING_STEPS, "each LoRA is judged once per run, on its first full steps"
    torch.testing.assert_close(samples, run_sampler(engine, routed)["samples"], rtol=0, atol=0)
    # a threshold between the two largest judged coverages of these seeded LoRAs makes the first of them a style
    judged = [min(step[i] for step in measured) for i in range(3)]
    ranked = sorted(range(3), key=lambda i: judged[i], reverse=True)
    threshold = (judged[ranked[0]] + judged[ranked[1]]) / 2
    style, subjects = ranked[0], sorted(ranked[1:])
    for routing in ("every step", "single pass"):
        caplog.clear()
        guider = make_guider(
            engine, "loratorio", patcher, stack, routing=routing, style_loras="applied everywhere", style_coverage=threshold
        )
        with caplog.at_level("INFO", logger="comfyui-loratorio"), ForwardCounter(patcher) as counter:
            found = run_sampler(engine, guider)["samples"]
        assert torch.isfinite(found).all() and not torch.allclose(found, samples, atol=1e-3), routing
        # the first two steps have every LoRA's rows, and the second finds the style; then it rides in
        # every row's weights
        full_step, without_style = 2 + 2 * 3, 2 + 2 * 2
        last = without_style if routing == "every step" else 2  # single pass: the third step is routed
        assert counter.rows == [full_step, full_step, last]
        maps = guider.weight_history.maps()  # every step, the routed steps of single pass included
        assert len(maps) == STEPS
        torch.testing.assert_close(maps[0].sum(dim=0), torch.ones_like(maps[0, style]))  # not judged yet: routed
        found_on = maps[1:]
        torch.testing.assert_close(found_on[:, style], torch.ones_like(found_on[:, style]))
        torch.testing.assert_close(found_on[:, subjects].sum(dim=1), torch.ones_like(found_on[:, style]))
        assert [r.getMessage() for r in caplog.records if "taken as a style" in r.getMessage()] == [
            f"comfyui-loratorio: LoRA '{guider.adapters.names[style]}' changes {100 * judged[style]:.0f}% of the image "
            "alike: taken as a style and applied everywhere"
        ]


def comfy_nodes_noise(seed: int):
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

    return Noise_RandomNoise(seed)


def test_no_weight_is_written_during_composition(engine, tiny_model_factory, sd15_stack):
    """Every base parameter keeps its tensor object and its in-place version counter: zero writes."""
    patcher = tiny_model_factory("sd15")
    before = {name: (id(p), p._version, p.data_ptr()) for name, p in patcher.model.named_parameters()}
    for method in ("loratorio", "composite", "switch"):
        run_sampler(engine, make_guider(engine, method, patcher, sd15_stack[:3]))
    after = {name: (id(p), p._version, p.data_ptr()) for name, p in patcher.model.named_parameters()}
    assert after == before


def test_a_second_run_with_the_same_loras_rebuilds_nothing(engine, tiny_model_factory, sd15_stack, loras_folder, monkeypatch):
    patcher = tiny_model_factory("sd15")
    engine.adapter_set.ROW_LAYERS.clear()
    builds = []
    original = engine.adapter_set.group_low_rank
    monkeypatch.setattr(engine.adapter_set, "group_low_rank", lambda *a, **k: builds.append(1) or original(*a, **k))
    first = run_sampler(engine, make_guider(engine, "loratorio", patcher, sd15_stack[:2]))["samples"]
    layers_built = len(builds)
    assert layers_built > 0
    second = run_sampler(engine, make_guider(engine, "loratorio", patcher, sd15_stack[:2]))["samples"]
    assert len(builds) == layers_built, "the second run rebuilt the stacks"
    torch.testing.assert_close(first, second)
    changed = [(name, 0.5 if i == 0 else strength, clip) for i, (name, strength, clip) in enumerate(sd15_stack[:2])]
    run_sampler(engine, make_guider(engine, "loratorio", patcher, changed))
    assert len(builds) == 2 * layers_built, "a new strength builds new stacks"


def test_each_adapter_keeps_its_rank_and_a_fused_slice_touches_only_its_channels(engine, tiny_model_factory, loras_folder):
    """Flux's fused q/k/v and linear1 layers take per-slice LoRAs: each slice is stacked at its own
    size, each adapter at its own rank, and no slot is kept for the base model's rows."""
    patcher = tiny_model_factory("flux")
    files = [write_peft(loras_folder / f"rank{rank}.safetensors", "flux", patcher.model, rank=rank, seed=rank) for rank in (2, 6)]
    adapters = engine.adapter_set.AdapterSet(patcher, [(f.name, 0.8) for f in files])
    diffusion_model = patcher.model.diffusion_model
    groups = [(name, group) for name, layer in adapters.row_layers.layers.items() for group in layer.low_rank]
    assert {group.adapters for _, group in groups} == {(0,), (1,)}, "adapters of different ranks share no padded stack"
    assert {group.down.shape[1] for _, group in groups} == {2, 6}
    sliced = [(name, g) for name, g in groups if g.size < diffusion_model.get_submodule(name).weight.shape[0]]
    assert sliced, "the tiny Flux model has fused layers that the file targets per slice"
    assert all(group.up.shape[1] == group.size for _, group in groups)
    base, first, second = row_predictions(engine, patcher, "flux", adapters, (-1, 0, 1))
    for row, lora_file in ((first, files[0]), (second, files[1])):
        expected = merged_prediction(patcher, "flux", comfy.utils.load_torch_file(str(lora_file), safe_load=True), 0.8)
        assert not torch.allclose(expected, base, atol=1e-3)
        tolerance = merge_tolerance()
        torch.testing.assert_close(row, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


def test_loha_runs_in_its_low_rank_form_where_that_is_smaller(engine, tiny_model_factory, loras_folder):
    """A rank-4 LoHa is a rank-16 low-rank delta (its Khatri-Rao form): used on the layers where 16
    ranks cost less than the weight, the exact dense delta elsewhere (exactness: the tests above)."""
    patcher = tiny_model_factory("sd15")
    path = write_lora(loras_folder / "loha.safetensors", "sd15", patcher.model, "loha", seed=4)
    parsed = engine.adapter_set.AdapterSet(patcher, [(path.name, 1.0)]).adapters[0].parsed
    assert parsed.factors and parsed.dense_patches, "the tiny SD1.5 has layers of both kinds"
    diffusion_model = patcher.model.diffusion_model
    for module, factors in parsed.factors.items():
        out_features, in_features = diffusion_model.get_submodule(module).weight.shape
        assert [f.rank for f in factors] == [16] and 16 * (in_features + out_features) < in_features * out_features
    for module in parsed.dense_patches:
        out_features, in_features = diffusion_model.get_submodule(module).weight.shape
        assert 16 * (in_features + out_features) >= in_features * out_features


def test_layers_are_found_as_get_submodule_finds_them(pack, tiny_model_factory):
    """The per-call lookup of every targeted layer returns ``get_submodule``'s module, and a name the
    model lacks fails as ``get_submodule`` fails, naming the missing part."""
    from comfyui_loratorio.loratorio_comfy.module_lookup import submodule

    for family in FAMILIES:
        root = tiny_model_factory(family).model.diffusion_model
        for name, module in root.named_modules():
            if name:
                assert submodule(root, tuple(name.split("."))) is module, name
    with pytest.raises(AttributeError, match="no_such_block"):
        submodule(root, ("no_such_block", "to_q"))


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_rows_in_any_order_get_their_own_adapters_delta(engine, family, tiny_model_factory, loras_folder):
    """Each adapter's rows together in stack order (one product per adapter), in reverse order, or
    interleaved: every row of a forward gets its own adapter's delta, as when computed alone."""
    patcher = tiny_model_factory(family)
    files = [write_lora(loras_folder / f"order{i}.safetensors", family, patcher.model, "kohya", seed=40 + i) for i in range(2)]
    adapters = engine.adapter_set.AdapterSet(patcher, [(f.name, 1.0) for f in files])
    if family == "sd15":  # the grouped convolution of the blocks is exercised too
        assert any(g.down.ndim == 5 for layer in adapters.row_layers.layers.values() for g in layer.low_rank)
    alone = dict(zip((-1, 0, 1), row_predictions(engine, patcher, family, adapters, (-1, 0, 1)), strict=True))
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)
    row_lora = engine.row_lora
    for row_map, segment in (
        ((-1, 0, 0, 1, 1), row_lora.RowSegment(1, 5, slice(0, 2), 2)),
        ((1, 1, 0, 0), None),
        ((0, 1, 0, 1), row_lora.RowSegment(0, 4, None, 1)),
        ((1, 1, 1), row_lora.RowSegment(0, 3, slice(1, 2), 3)),
    ):
        (found,) = row_lora.RowPlan(row_map, torch.device("cpu")).group_rows((0, 1)).segments
        if segment is not None:
            assert found._replace(index=None) == segment._replace(index=None)
            assert segment.index is None or found.index == segment.index
        rows = row_predictions(engine, patcher, family, adapters, row_map)
        tolerance = batch_tolerance()
        for adapter, row in zip(row_map, rows, strict=True):
            expected = alone[adapter]
            torch.testing.assert_close(row, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


@pytest.mark.parametrize("method", ["loratorio", "composite"])
def test_a_steps_rows_arrive_adapter_by_adapter_and_gather_no_weights(engine, tiny_model_factory, sd15_stack, method):
    """The guiders hand ComfyUI their rows so that each adapter's cond and uncond rows sit together,
    in stack order: the hooks view the stacks (no index_select) and make one product per adapter."""
    from dispatch_count import ComputeCalls

    patcher = tiny_model_factory("sd15")
    guider = make_guider(engine, method, patcher, sd15_stack[:3], cfg=5.0, recentre_lambda=0.5)
    seen = []
    original = engine.row_lora.RowLayers.plan
    with ComputeCalls() as counter, pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            engine.row_lora.RowLayers, "plan", lambda self, rows, *rest: seen.append(rows) or original(self, rows, *rest)
        )
        run_sampler(engine, guider)
    adapter_rows = {tuple(a for a in rows if a >= 0) for rows in seen}
    assert adapter_rows == {(0, 0, 1, 1, 2, 2)}
    assert counter.calls["index_select"] == 0
    assert counter.calls["baddbmm_"] > 0
