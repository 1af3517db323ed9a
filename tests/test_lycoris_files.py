"""LoRA files written by LyCORIS itself (``lycoris-lora``, the library kohya's sd-scripts, OneTrainer and
SimpleTuner train LyCORIS adapters with), in every algorithm and option it saves, applied per row
exactly as ComfyUI's LoraLoader applies them."""

from __future__ import annotations

import logging
from pathlib import Path

import comfy.model_management
import comfy.utils
import pytest
import torch

from support.engine_helpers import adapter_row_prediction, merged_prediction
from support.lora_files import write_lycoris_trained
from support.tiny_models import FAMILIES, conditioning, latent, merge_tolerance, timesteps

# what each trainer's LyCORIS options turn into in the file: create_lycoris's keyword arguments, and a
# tensor suffix the file must then hold (so that an option LyCORIS ignored cannot pass unnoticed)
ALGORITHMS = {
    "locon": ({"algo": "locon"}, "lora_down.weight"),
    "locon-tucker": ({"algo": "locon", "use_tucker": True}, "lora_mid.weight"),
    "locon-scalar": ({"algo": "locon", "use_scalar": True}, "lora_up.weight"),
    "dora": ({"algo": "locon", "dora_wd": True}, "dora_scale"),
    "loha": ({"algo": "loha"}, "hada_w1_a"),
    "loha-tucker": ({"algo": "loha", "use_tucker": True}, "hada_t1"),
    "loha-dora": ({"algo": "loha", "dora_wd": True}, "dora_scale"),
    "lokr": ({"algo": "lokr", "factor": 4}, "lokr_w2_a"),
    "lokr-full-matrix": ({"algo": "lokr", "full_matrix": True}, "lokr_w2"),
    "lokr-dora": ({"algo": "lokr", "factor": 4, "dora_wd": True}, "dora_scale"),
    "full": ({"algo": "full"}, "diff_b"),
    "diag-oft": ({"algo": "diag-oft"}, "oft_blocks"),
    "boft": ({"algo": "boft"}, "oft_blocks"),
    "glora": ({"algo": "glora"}, "a1.weight"),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_files_lycoris_writes_equal_lora_loader(engine, family, name, tiny_model_factory, loras_folder: Path, caplog):
    options, suffix = ALGORITHMS[name]
    patcher = tiny_model_factory(family)
    path = write_lycoris_trained(loras_folder / f"{name}.safetensors", family, patcher.model, options, seed=3)
    state = comfy.utils.load_torch_file(str(path))
    if "tucker" not in name or family in ("sd15", "sdxl"):  # LyCORIS applies Tucker to convolutions only
        assert any(key.endswith(f".{suffix}") for key in state), sorted(state)
    expected = merged_prediction(patcher, family, state, 0.8)
    comfy.model_management.load_models_gpu([patcher])
    with torch.no_grad():
        plain = patcher.model.apply_model(latent(family), timesteps(2.0), **conditioning(family))
    assert not torch.allclose(expected, plain, atol=1e-3), "the file changes the prediction"
    with caplog.at_level(logging.WARNING):
        got = adapter_row_prediction(engine, patcher, family, path.name, 0.8)
    warnings = [record.getMessage() for record in caplog.records if record.name == "comfyui-loratorio"]
    if name == "full" and family in ("sd3", "flux"):
        # ComfyUI maps a bias diff on a slice of a fused qkv weight to the key "().bias" and skips it (NOT LOADED)
        assert len(warnings) == 1 and "parameters this model does not have (e.g. ().bias" in warnings[0], warnings
    else:
        assert not warnings, "every layer of the file is matched and applied"
    tolerance = merge_tolerance()
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
