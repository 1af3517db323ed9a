"""The toy world of the composition-quality benchmark (``tools/quality``): detector, model, LoRA files."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import torch
from quality import detector, toy_model, world


def rendered(image: torch.Tensor) -> np.ndarray:
    return world.as_images(image[None])[0].numpy()


def test_detector_finds_every_drawn_concept_and_nothing_else():
    generator = torch.Generator().manual_seed(0)
    for concept in world.CONCEPTS:
        for _ in range(100):
            image, words = world.concept_example(concept, generator)
            assert words == [concept.trigger]
            found = detector.detect(rendered(image))
            assert found.present == {concept.name}, f"{concept.name}: detector saw {set(found.present)}"


def test_detector_sees_no_concept_in_the_base_models_washed_out_shapes():
    generator = torch.Generator().manual_seed(1)
    for _ in range(200):
        image, words = world.base_example(generator)
        assert set(words) <= set(world.SHAPES)
        assert not detector.detect(rendered(image)).colour_present


def test_shape_check_tells_a_red_square_from_the_ruby_disk():
    generator = torch.Generator().manual_seed(2)
    ruby = world.CONCEPTS_BY_NAME["ruby-disk"]
    image = world.blank()
    world.paint(image, world.shape_mask("square", generator), ruby.colour)
    found = detector.detect(rendered(image))
    assert "ruby-disk" in found.colour_present and "ruby-disk" not in found.present


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory, engine):
    """A toy base model and one concept LoRA, written the way train.py writes them (not trained)."""
    from quality.train import LORA_RANK, TrainableLoRA

    folder = tmp_path_factory.mktemp("toy")
    model, embedding = toy_model.new_model(seed=3)
    toy_model.save_base(folder / toy_model.BASE_FILE, model, embedding)
    lora = TrainableLoRA(model.diffusion_model, LORA_RANK, seed=4)
    for _, up in lora.factors.values():
        torch.nn.init.normal_(up, std=0.1)  # a trained LoRA's up factors are not zero
    lora.remove()
    concept = world.CONCEPTS_BY_NAME["ruby-disk"]
    safetensors.torch.save_file(lora.state_dict(), str(folder / toy_model.lora_file(concept)))
    return folder, concept, len(lora.factors)


def test_toy_lora_is_read_fully_by_comfyuis_lora_loader_and_the_per_row_engine(engine, toy_files):
    import comfy.lora

    folder, concept, layers = toy_files
    patcher, table = toy_model.load_base(folder / toy_model.BASE_FILE)
    assert table.shape == (len(world.VOCABULARY), toy_model.CONTEXT_DIM)
    state = safetensors.torch.load_file(str(folder / toy_model.lora_file(concept)))
    patches = comfy.lora.load_lora(state, comfy.lora.model_lora_keys_unet(patcher.model, {}), log_missing=False)
    # 4 transformer blocks x (q, k, v, out of both attentions + 2 feed-forward layers),
    # 11 res blocks x 2 convolutions, and the output convolution
    assert len(patches) == layers == 4 * 10 + 11 * 2 + 1
    parsed = engine.adapters.parse_lora(state, patcher.model, concept.name)
    assert parsed.matched == parsed.total == layers and not parsed.needs_fallback


def test_toy_model_samples_through_every_method_of_the_harness(pack, toy_files, monkeypatch):
    import folder_paths
    from quality.harness import METHODS, Scores, ToyRun, score_images

    folder, concept, _ = toy_files
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", folder_paths.folder_names_and_paths["loras"])
    toy = ToyRun(pack, folder, images=2, steps=2)
    for method in ("base", "single", *METHODS):
        images = toy.generate(method, [concept], seed=1)
        assert images.shape == (2, world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and np.isfinite(images).all()
        scores = Scores(method, folder.name, [concept.name])
        score_images(images, scores.concepts, scores)
        assert len(scores.recall) == 2
