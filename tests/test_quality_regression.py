"""Composition quality in the toy world: a small version of ``tools/quality/harness.py`` for CI.

The shipped first training seed (``tools/quality/models/seed-0``) runs through the pack's nodes with
the frozen method settings, and the detector's recall must stay above floors set from the
harness's run (README, "Composition quality") on these same images, with a little slack. A change
that breaks a LoRA path, the routing or the re-centred guidance drops recall below them; so does
one that makes LoRAtorio no better than averaging the adapters.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

MODELS = Path(__file__).resolve().parent.parent / "tools" / "quality" / "models" / "seed-0"
IMAGES = 16
# Pairs from the held-out test split: two colours apart, a shape and the stripe that crosses it,
# a shape and the global style.
PAIRS = (("amber-triangle", "cobalt-square"), ("ruby-disk", "lemon-stripe"), ("cobalt-square", "dusk-style"))
# Floors from the harness's full run on the same models and sampling seed (README, "Composition
# quality"; tools/quality/reference/seed-0.json), whose first 16 images per combination are these:
# measured there, per concept alone 1.0 except cobalt 0.62; on the pairs LoRAtorio 0.42, Merge 0.29,
# Switch 0.04, Composite 0.0. Each floor leaves about two images per pair of slack; Switch's (at
# cfg 1, tau 3 it rarely draws a concept in 12 steps) only catches it drawing nothing. Composite has
# no floor of its own (it is at 0); LoRAtorio's lead over it is checked instead.
SINGLE_FLOOR = 0.5
PAIR_FLOORS = {"loratorio": 0.3, "merge": 0.18, "switch": 0.02}
LORATORIO_LEAD_OVER_COMPOSITE = 0.25


@pytest.fixture(scope="module")
def toy(pack):
    import folder_paths
    from quality.harness import ToyRun

    if not (MODELS / "toy-base.safetensors").is_file():
        pytest.fail(f"the shipped toy models are missing from {MODELS}; recreate them with tools/quality/train.py --seed 0")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(folder_paths.folder_names_and_paths, "loras", folder_paths.folder_names_and_paths["loras"])
        yield ToyRun(pack, MODELS, images=IMAGES, steps=12)
    # the cache holds the run's ModelPatcher; freed at interpreter exit, its __del__ fails noisily
    recall.cache_clear()


@functools.cache
def recall(toy, method: str, names: tuple[str, ...]) -> np.ndarray:
    from quality.harness import frozen_settings, scored
    from quality.world import CONCEPTS_BY_NAME

    settings = frozen_settings()[0].get(method)
    scores, _ = scored(toy, method, [CONCEPTS_BY_NAME[n] for n in names], seed=1, settings=settings)
    return np.asarray(scores.recall)


def test_each_concept_lora_alone_draws_its_concept_and_the_trigger_word_alone_does_not(toy):
    from quality.world import CONCEPTS

    for concept in CONCEPTS:
        alone, without = recall(toy, "single", (concept.name,)).mean(), recall(toy, "base", (concept.name,)).mean()
        assert alone >= SINGLE_FLOOR, f"{concept.name}: the LoRA alone drew it in {alone:.2f} of the images"
        assert without <= 0.1, f"{concept.name}: the base model drew it without the LoRA in {without:.2f}"


@pytest.mark.parametrize("method", sorted(PAIR_FLOORS))
def test_composing_two_concepts_keeps_recall_above_its_floor(toy, method):
    mean = np.mean([recall(toy, method, pair).mean() for pair in PAIRS])
    assert mean >= PAIR_FLOORS[method], f"{method}: recall {mean:.2f} on {PAIRS}"


def test_loratorio_composes_better_than_averaging_the_adapters(toy):
    lead = np.mean([recall(toy, "loratorio", pair).mean() - recall(toy, "composite", pair).mean() for pair in PAIRS])
    assert lead >= LORATORIO_LEAD_OVER_COMPOSITE, f"LoRAtorio minus Composite: {lead:.2f}"
