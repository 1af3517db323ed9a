"""Contracts with newer ComfyUI, checked on whatever ComfyUI runs the suite (0.3.75 in CI).

Each test replays a call that a newer release makes into the pack, in the form its source makes it
(read from the v0.6.0 and v0.33.0 release trees; see docs/compatibility.md), through ComfyUI's own
``WrapperExecutor``. They fail when a wrapper, callback or override stops accepting what newer
ComfyUI passes: the class of break that made every composition node raise a TypeError from v0.6.0 on.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import struct

import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import pytest
import torch

from support.engine_helpers import assert_no_hooks_left, make_guider, run_sampler
from support.lora_files import write_lora
from support.tiny_models import build_model, conditioning, latent, timesteps

# keywords ComfyUI added to the wrapper calls after 0.3.75, and one no release has yet
PREPARE_SAMPLING_KEYWORDS = {"force_full_load": True, "force_offload": False, "a_future_option": 1}


def test_prepare_sampling_wrapper_passes_on_every_keyword(engine, tiny_model_factory, sd15_loras):
    """v0.6.0: ``executor.execute(model, noise_shape, conds, model_options=..., force_full_load=...)``;
    v0.33.0 adds ``force_offload=``."""
    guider = make_guider(engine, "loratorio", tiny_model_factory("sd15"), sd15_loras, recentre_lambda=0.5)
    received = {}

    def prepare_sampling(model, noise_shape, conds, model_options=None, **kwargs):
        received.update(noise_shape=noise_shape, model_options=model_options, **kwargs)
        return "prepared"

    wrappers = comfy.patcher_extension.get_all_wrappers(
        comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, guider.model_options, is_model_options=True
    )
    assert wrappers, "the guider registers a PREPARE_SAMPLING wrapper"
    executor = comfy.patcher_extension.WrapperExecutor.new_executor(prepare_sampling, wrappers)
    options = {"marker": 1}
    result = executor.execute(guider.model_patcher, (1, 4, 8, 8), {}, model_options=options, **PREPARE_SAMPLING_KEYWORDS)
    assert result == "prepared"
    assert received["model_options"] is options
    assert {k: received[k] for k in PREPARE_SAMPLING_KEYWORDS} == PREPARE_SAMPLING_KEYWORDS
    rows = guider.rows_per_step()
    assert received["noise_shape"][0] >= rows // 2 + rows % 2, "memory is reserved for the real row count (and the deltas)"


@pytest.mark.parametrize("extra", [{}, {"attention_mask": None, "a_future_input": 3}])
def test_apply_model_wrapper_accepts_newer_keywords(engine, tiny_model_factory, sd15_loras, extra):
    """``BaseModel.apply_model`` passes ``(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)``
    to APPLY_MODEL wrappers; newer releases add keyword conditioning (attention masks, ref latents)."""
    patcher = tiny_model_factory("sd15")
    guider = make_guider(engine, "composite", patcher, sd15_loras)
    adapters = guider.adapters
    seen = {}

    def apply_model(x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        seen.update(kwargs)
        return patcher.model.diffusion_model(x, t, context=c_crossattn)

    kwargs = conditioning("sd15", batch=2)
    with engine.row_lora.row_layers_registered(adapters.row_layers) as run_id:
        options = {
            engine.row_lora.ROW_MAP_KEY: {
                "run": run_id,
                "rows": (0, 1),
                "kinds": (0, 1),
            },
            "cond_or_uncond": [1, 0],
            "an_option_from_a_newer_release": True,
        }
        executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(
            apply_model, patcher.model, [engine.row_lora.apply_model_with_rows]
        )
        with torch.no_grad():
            out = executor.execute(
                latent("sd15", batch=2), timesteps(5.0, 5.0), None, kwargs["c_crossattn"], None, options, **extra
            )
    assert out.shape[0] == 2 and seen == extra
    assert_no_hooks_left(patcher)


def test_guider_overrides_keep_cfgguider_signatures(engine):
    """Our guiders override ``predict_noise`` and ``sample``; ComfyUI calls them positionally and by keyword."""
    base = comfy.samplers.CFGGuider
    for guider_class in (engine.guiders.LoRAtorioGuider, engine.guiders.LoRACompositeGuider, engine.guiders.LoRASwitchGuider):
        ours = inspect.signature(guider_class.predict_noise).parameters
        assert list(ours)[:4] == list(inspect.signature(base.predict_noise).parameters)[:4]
        sample = inspect.signature(guider_class.sample).parameters
        assert any(p.kind is p.VAR_POSITIONAL for p in sample.values()) and any(p.kind is p.VAR_KEYWORD for p in sample.values())


def test_empty_latent_with_downscale_ratio_samples_like_ksampler(engine, tiny_model_factory, sd15_loras):
    """Newer ``EmptyLatentImage`` outputs ``downscale_ratio_spacial``; KSampler reads it (where ComfyUI's
    ``fix_empty_latent_channels`` takes it) and drops it from its output. So do we."""
    guider = make_guider(engine, "switch", tiny_model_factory("sd15"), sd15_loras)
    out = run_sampler(engine, guider, {"samples": torch.zeros(1, 4, 16, 16), "downscale_ratio_spacial": 8})
    assert "downscale_ratio_spacial" not in out
    assert out["samples"].shape == (1, 4, 16, 16) and torch.isfinite(out["samples"]).all()
    accepted = inspect.signature(comfy.sample.fix_empty_latent_channels).parameters
    forwarded = engine.sampling._latent_scale_arguments({"downscale_ratio_spacial": 16})
    assert forwarded == (
        {"downscale_ratio_spacial": 16, "downscale_ratio_temporal": None} if "downscale_ratio_spacial" in accepted else {}
    )


def test_loader_errors_of_the_aimdo_parser_name_the_file(engine, tiny_model_factory, loras_folder, monkeypatch):
    """With comfy-aimdo on (newer ComfyUI on NVIDIA), ``load_torch_file`` parses safetensors itself and a
    damaged file raises ``struct.error`` (too short for a header) or ``KeyError`` (a header entry without
    ``data_offsets``). Where this ComfyUI has that parser it runs for real; elsewhere its errors are replayed."""
    memory_management = importlib.util.find_spec("comfy.memory_management") and importlib.import_module("comfy.memory_management")
    (loras_folder / "short.safetensors").write_bytes(b"\x01\x02")
    (loras_folder / "no_offsets.safetensors").write_bytes(struct.pack("<Q", 24) + b'{"w": {"dtype": "F32"}}' + b" ")
    if hasattr(memory_management, "aimdo_enabled") and hasattr(comfy.utils, "load_safetensors"):
        monkeypatch.setattr(memory_management, "aimdo_enabled", True)
    else:
        errors = {
            "short.safetensors": struct.error("unpack requires a buffer of 8 bytes"),
            "no_offsets.safetensors": KeyError("data_offsets"),
        }

        def newer_loader(path, *args, **kwargs):
            raise errors[path.rsplit("/", 1)[-1]]

        monkeypatch.setattr(comfy.utils, "load_torch_file", newer_loader)
    for name in ("short.safetensors", "no_offsets.safetensors"):
        engine.adapters.LORA_FILES._entries.clear()
        with pytest.raises(engine.adapters.LoRAInputError, match=rf"'{name}' could not be read.*truncated or corrupt"):
            engine.adapter_set.AdapterSet(tiny_model_factory("sd15"), [(name, 1.0)])


def test_multi_gpu_clone_rows_carry_their_adapters(engine, tiny_model_factory, sd15_loras):
    """ComfyUI's multi-GPU path runs some rows on a clone's ``BaseModel`` (``_calc_cond_batch_multigpu``
    calls ``model_current.apply_model``): the per-call hooks go on the model that call runs."""
    patcher = tiny_model_factory("sd15")
    clone_model = build_model("sd15", seed=0).model  # another model with the same weights, as a multi-GPU clone is
    guider = make_guider(engine, "composite", patcher, sd15_loras)
    kwargs = {k: v.repeat(2, *([1] * (v.ndim - 1))) for k, v in conditioning("sd15").items()}
    x, t = latent("sd15").repeat(2, 1, 1, 1), timesteps(5.0, 5.0)
    outputs = []
    with engine.row_lora.row_layers_registered(guider.adapters.row_layers) as run_id:
        plan = {"run": run_id, "rows": (-1, 0), "kinds": (0, 0)}
        for model in (patcher.model, clone_model):
            options = {engine.row_lora.ROW_MAP_KEY: plan, "cond_or_uncond": [0, 1]}
            comfy.patcher_extension.add_wrapper_with_key(
                comfy.patcher_extension.WrappersMP.APPLY_MODEL, "loratorio", engine.row_lora.apply_model_with_rows, options
            )
            with torch.no_grad():
                outputs.append(model.apply_model(x, t, transformer_options=options, **kwargs))
    torch.testing.assert_close(outputs[0], outputs[1])
    assert not torch.allclose(outputs[1][0], outputs[1][1], atol=1e-3), "the adapter row differs from the base row"
    assert_no_hooks_left(patcher)


@pytest.fixture
def sd15_loras(tiny_model_factory, loras_folder) -> list[tuple[str, float, float]]:
    model = tiny_model_factory("sd15").model
    return [
        (write_lora(loras_folder / f"c{i}.safetensors", "sd15", model, "kohya", seed=20 + i).name, 1.0, 1.0) for i in range(2)
    ]
