"""The toy world of the composition-quality benchmark (``tools/quality``): detector, model, LoRA files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch
from quality import detector, toy_model, world


def rendered(image: torch.Tensor) -> np.ndarray:
    return world.as_images(image[None])[0].numpy()


def test_detector_finds_every_drawn_concept_and_nothing_else():
    generator = torch.Generator().manual_seed(0)
    for concept in world.ALL_CONCEPTS:
        for _ in range(100):
            image, words = world.concept_example(concept, generator)
            assert words == ([concept.trigger] if concept in world.CONCEPTS else [concept.trigger, "disk"])
            found = detector.detect(rendered(image))
            assert found.present == {concept.name}, f"{concept.name}: detector saw {set(found.present)}"


def test_detector_sees_no_concept_in_the_base_models_washed_out_shapes():
    generator = torch.Generator().manual_seed(1)
    for _ in range(200):
        image, words = world.base_example(generator)
        assert set(words) <= set(world.SHAPES)
        assert not detector.detect(rendered(image)).colour_present


def test_placement_finds_a_character_in_its_own_half_and_its_colour_bleeding_into_the_other():
    from quality.harness import subject_regions

    jade = world.CONCEPTS_BY_NAME["jade-disk"]
    ys, xs = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    image = world.blank()
    world.paint(image, (ys - 16) ** 2 + (xs - 8) ** 2 <= 36, jade.colour)  # a disk in the left half
    regions = {name: mask.numpy() > 0.5 for name, mask in subject_regions().items()}

    def jade_pixels(image: torch.Tensor) -> np.ndarray:
        return detector.colour_masks(rendered(image))["jade-disk"]

    assert detector.placement(jade_pixels(image), jade, regions["jade-disk"]) == (True, False)
    assert detector.placement(jade_pixels(image), jade, regions["aqua-disk"]) == (False, True)
    world.paint(image, (ys - 16) ** 2 + (xs - 8) ** 2 <= 36, world.CONCEPTS_BY_NAME["aqua-disk"].colour)
    assert detector.placement(jade_pixels(image), jade, regions["jade-disk"]) == (False, False)  # no jade drawn


def test_a_base_trained_before_the_characters_gets_their_words_the_same_way_on_every_load(tmp_path):
    model, embedding = toy_model.new_model(seed=5)
    older = torch.nn.Embedding.from_pretrained(embedding.weight[: len(world.VOCABULARY) - len(world.CHARACTERS)])
    toy_model.save_base(tmp_path / "old" / toy_model.BASE_FILE, model, older)
    (_, first), (_, again) = (toy_model.load_base(tmp_path / "old" / toy_model.BASE_FILE) for _ in range(2))
    assert first.shape == (len(world.VOCABULARY), toy_model.CONTEXT_DIM) and torch.equal(first, again)
    assert torch.equal(first[: older.weight.shape[0]], older.weight)
    assert not torch.equal(first[-1], first[-2])  # each added word its own embedding


def test_shape_check_tells_a_red_square_from_the_ruby_disk():
    generator = torch.Generator().manual_seed(2)
    ruby = world.CONCEPTS_BY_NAME["ruby-disk"]
    image = world.blank()
    world.paint(image, world.shape_mask("square", generator), ruby.colour)
    found = detector.detect(rendered(image))
    assert "ruby-disk" in found.colour_present and "ruby-disk" not in found.present


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory, engine):
    """A toy base model and every concept's LoRA, written the way train.py writes them (not trained)."""
    from quality.train import LORA_RANK, TrainableLoRA

    folder = tmp_path_factory.mktemp("toy")
    model, embedding = toy_model.new_model(seed=3)
    toy_model.save_base(folder / toy_model.BASE_FILE, model, embedding)
    for index, concept in enumerate(world.CONCEPTS):
        lora = TrainableLoRA(model.diffusion_model, LORA_RANK, seed=4 + index)
        for _, up in lora.factors.values():
            torch.nn.init.normal_(up, std=0.1)  # a trained LoRA's up factors are not zero
        lora.remove()
        safetensors.torch.save_file(lora.state_dict(), str(folder / toy_model.lora_file(concept)))
    return folder, world.CONCEPTS_BY_NAME["ruby-disk"], len(lora.factors)


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
    assert parsed.matched == parsed.total == layers and not parsed.dense_patches


def test_toy_model_samples_through_every_method_of_the_harness(pack, toy_files, monkeypatch):
    import folder_paths
    from quality.harness import METHODS, NEEDS_REGIONS, Scores, ToyRun, score_images, subject_regions

    folder, concept, _ = toy_files
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", folder_paths.folder_names_and_paths["loras"])
    toy = ToyRun(pack, folder, images=2, steps=2)
    regions = {concept.name: subject_regions()["jade-disk"]}
    for method in ("base", "single", *METHODS):
        images = toy.generate(method, [concept], seed=1, regions=regions if method in NEEDS_REGIONS else None)
        assert images.shape == (2, world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and np.isfinite(images).all()
        scores = Scores(method, folder.name, [concept.name])
        score_images(images, scores.concepts, scores, regions)
        assert len(scores.recall) == len(scores.placed) == 2


def test_styles_merged_method_takes_the_styles_out_of_the_routing(pack, toy_files, monkeypatch):
    """``loratorio-styles-merged`` is LoRAtorio with the same settings where no style is asked for (or
    only styles are), and something else where a style sits beside a subject: the style is merged."""
    import folder_paths
    from quality.harness import DEFAULT_SETTINGS, ToyRun

    folder, subject, _ = toy_files
    style = world.CONCEPTS_BY_NAME["dusk-style"]
    assert style.is_style and not subject.is_style
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", folder_paths.folder_names_and_paths["loras"])
    toy = ToyRun(pack, folder, images=2, steps=2)
    settings = DEFAULT_SETTINGS["loratorio-styles-merged"]
    for concepts, same in (([subject], True), ([style], True), ([subject, style], False)):
        merged = toy.generate("loratorio-styles-merged", concepts, seed=1, settings=settings)
        routed = toy.generate("loratorio", concepts, seed=1, settings=settings)
        assert np.array_equal(merged, routed) == same, [c.name for c in concepts]


def test_toy_runs_in_one_process_each_sample_their_own_seeds_loras(pack, toy_files, tmp_path, monkeypatch):
    """tune.py makes every seed's run first, then samples them in turn: each must use its own LoRAs."""
    import folder_paths
    from quality.harness import ToyRun

    folder, concept, _ = toy_files
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", folder_paths.folder_names_and_paths["loras"])
    alone = ToyRun(pack, folder, images=2, steps=2).generate("single", [concept], seed=1)
    without_loras = tmp_path / "base-only"
    without_loras.mkdir()
    (without_loras / toy_model.BASE_FILE).symlink_to(folder / toy_model.BASE_FILE)
    first = ToyRun(pack, folder, images=2, steps=2)
    ToyRun(pack, without_loras, images=2, steps=2)  # made last, not sampled
    np.testing.assert_array_equal(first.generate("single", [concept], seed=1), alone)


def test_tuning_scores_every_candidate_and_keeps_the_best(pack, toy_files, monkeypatch):
    import folder_paths
    from quality import tune
    from quality.harness import ToyRun, combinations

    folder, _, _ = toy_files
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", folder_paths.folder_names_and_paths["loras"])
    monkeypatch.setattr(tune, "TUNING_GRID", {"merge": {"strength": (0.0, 1.0), "cfg": (1.0, 3.0)}})
    monkeypatch.setattr(tune, "SIZES", (2,))
    assert len(combinations([2], "tune")) == 3
    logged = []
    best, candidates = tune.tune_method([ToyRun(pack, folder, images=2, steps=2)], "merge", seed=1, log=logged.append)
    # coordinate search: both strengths at the default cfg 3, then the other cfg at the better strength
    tried = [c["settings"] for c in candidates]
    assert tried[:2] == [{"cfg": 3.0, "strength": 0.0}, {"cfg": 3.0, "strength": 1.0}]
    assert len(tried) == 3 and tried[2]["cfg"] == 1.0 and len(logged) == 3
    scores = {json.dumps(c["settings"], sort_keys=True): (c["recall"], c["all_present"]) for c in candidates}
    assert scores[json.dumps(best, sort_keys=True)] == max(scores.values())
    assert all(0.0 <= c["recall"] <= 1.0 for c in candidates)

    # a second search under the same context reuses every score; a different context reuses none
    run = ToyRun(pack, folder, images=2, steps=2)
    record = {**tune.tuning_context([run], seed=1), "candidates": candidates}
    known = tune.earlier_candidates(record, tune.tuning_context([run], seed=1))
    again, reused = tune.tune_method([run], "merge", seed=1, log=logged.append, known=known)
    assert again == best and reused == candidates and len(logged) == 3
    assert tune.earlier_candidates(record, tune.tuning_context([run], seed=2)) == {}
    assert tune.earlier_candidates(None, tune.tuning_context([run], seed=1)) == {}


def test_harness_uses_the_frozen_settings_and_the_defaults_for_untuned_methods(tmp_path, monkeypatch):
    from quality import harness

    monkeypatch.setattr(harness, "SETTINGS_FILE", tmp_path / "method_settings.json")
    settings, source = harness.frozen_settings()
    assert settings == harness.DEFAULT_SETTINGS and "not tuned" in source
    (tmp_path / "method_settings.json").write_text(json.dumps({"settings": {"merge": {"cfg": 5.0, "strength": 0.5}}}))
    settings, source = harness.frozen_settings()
    assert settings["merge"] == {"cfg": 5.0, "strength": 0.5}
    assert settings["loratorio"] == harness.DEFAULT_SETTINGS["loratorio"]
    assert "not tuned, for switch, composite, loratorio, loratorio-routed" in source


def test_compare_flags_only_means_beyond_the_tolerance():
    from quality.harness import means_beyond_tolerance

    def row(method, n, recall, present):
        return {"method": method, "n": n, "recall": (recall, 0, 1), "all_present": (present, 0, 1)}

    reference = [row("loratorio", 2, 0.60, 0.30), row("merge", 2, 0.10, 0.0)]
    assert means_beyond_tolerance([row("loratorio", 2, 0.65, 0.25), row("merge", 3, 0.9, 0.9)], reference, 0.1) == []
    assert means_beyond_tolerance([row("loratorio", 2, 0.45, 0.30), row("merge", 2, 0.10, 0.25)], reference, 0.1) == [
        "loratorio N=2 recall: 0.45, reference 0.60",
        "merge N=2 all_present: 0.25, reference 0.00",
    ]


def test_paired_differences_give_a_verdict_only_when_the_interval_excludes_zero():
    from quality.harness import Scores, paired_differences

    def scores(method, seed, recall):
        return Scores(method, seed, ["ruby-disk", "cobalt-square"], recall=recall)

    runs = []
    for seed in ("seed-0", "seed-1", "seed-2"):
        runs += [
            scores("loratorio", seed, [1.0, 0.5] * 32),
            scores("merge", seed, [0.0, 0.5] * 32),  # always lower: better
            scores("composite", seed, [0.5, 1.0] * 32),  # lower on half the images, higher on the rest: no difference
            scores("switch", seed, [1.0, 1.0] * 32),  # never lower, higher on half: worse
        ]
    verdicts = {row["other"]: row for row in paired_differences(runs)}
    assert {row["n"] for row in verdicts.values()} == {2}
    assert verdicts["merge"]["verdict"] == "better" and verdicts["merge"]["difference"][0] == 0.5
    assert verdicts["composite"]["verdict"] == "no clear difference" and verdicts["composite"]["difference"][0] == 0.0
    assert verdicts["switch"]["verdict"] == "worse" and verdicts["switch"]["difference"][0] == -0.25


def test_tuning_and_test_combinations_split_every_combination_and_tuning_weighs_concepts_evenly():
    from collections import Counter

    from quality.harness import TUNING_COMBINATIONS, combinations

    tune, test, every = (combinations([2, 3, 4], split) for split in ("tune", "test", "all"))
    assert len(every) == 10 + 10 + 5 and not set(tune) & set(test) and set(tune) | set(test) == set(every)
    assert [tuple(c.name for c in combo) for combo in tune] == list(TUNING_COMBINATIONS)  # every listed name exists
    appearances = Counter(concept.name for combo in tune for concept in combo)
    assert set(appearances) == {c.name for c in world.CONCEPTS} and set(appearances.values()) <= {4, 5}


def test_character_and_region_scenarios_hold_out_every_combination_and_masks_only_routing_asks_for_regions():
    from quality.harness import SCENARIO_COMBINATIONS, combinations, parse_methods, subject_regions

    for scenario, listed in SCENARIO_COMBINATIONS.items():
        assert [tuple(c.name for c in combo) for combo in combinations([2, 3, 4], "test", scenario)] == list(listed)
        assert combinations([2, 3, 4], "tune", scenario) == [] and len(combinations([3], "all", scenario)) == 2
    regions = subject_regions()
    assert {name for combo in SCENARIO_COMBINATIONS["regions"] for name in combo} - set(regions) == {"dusk-style"}
    assert torch.equal(regions["ruby-disk"] + regions["cobalt-square"], torch.ones(32, 32))
    assert "loratorio-masks" in parse_methods(None, "regions") and "loratorio-masks" not in parse_methods(None)
    with pytest.raises(SystemExit, match="--scenario regions"):
        parse_methods("merge,loratorio-masks", "same-class")


def test_runs_made_side_by_side_combine_into_one_report_and_mismatched_ones_are_refused(tmp_path):
    from quality.harness import DEFAULT_SETTINGS, Scores, combined_runs, write_report

    sampling = {"split": "test", "images": 2, "steps": 12, "seed": 1}
    for seed, recall in (("seed-0", [1.0, 0.5]), ("seed-1", [0.0, 0.5])):
        runs = [
            Scores(m, seed, ["ruby-disk", "cobalt-square"], recall=recall, all_present=[True, False])
            for m in ("merge", "loratorio")
        ]
        for run in runs:
            run.colour_recall, run.empty, run.wrong = list(recall), [False, False], [False, False]
        write_report(tmp_path / seed, runs, {**sampling, "training_seeds": [seed]}, DEFAULT_SETTINGS, "defaults")
    runs, combined, _, _ = combined_runs([tmp_path / "seed-0" / "results.json", tmp_path / "seed-1" / "results.json"])
    assert combined["training_seeds"] == ["seed-0", "seed-1"] and len(runs) == 4
    table, _ = write_report(tmp_path / "both", runs, combined, DEFAULT_SETTINGS, "defaults")
    assert "2 training seed(s)" in table and "| loratorio | 2 | 0.50 [" in table
    assert "| recall per combination | merge | loratorio |\n|---|---|---|\n| ruby + cobalt | 0.50 | 0.50 |" in table
    with pytest.raises(SystemExit, match="more than one"):
        combined_runs([tmp_path / "seed-0" / "results.json", tmp_path / "seed-0" / "results.json"])
    altered = json.loads((tmp_path / "seed-1" / "results.json").read_text())
    altered["sampling"]["images"] = 64
    (tmp_path / "altered.json").write_text(json.dumps(altered))
    with pytest.raises(SystemExit, match="differ in sampling"):
        combined_runs([tmp_path / "seed-0" / "results.json", tmp_path / "altered.json"])


def test_reports_that_cannot_be_read_are_refused_with_what_to_pass(tmp_path):
    from quality.harness import combined_runs, read_report

    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other.json").write_text("{}")
    (tmp_path / "summary.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match=r"cannot read .*missing.json as a harness report"):
        read_report(tmp_path / "missing.json")
    with pytest.raises(SystemExit, match=r"cannot read .*broken.json"):
        read_report(tmp_path / "broken.json")
    with pytest.raises(SystemExit, match="not a harness report"):
        read_report(tmp_path / "other.json")
    with pytest.raises(SystemExit, match=r"needs results.json files, not summary.json"):
        combined_runs([tmp_path / "summary.json"])


def test_training_reproduces_a_lora_whether_the_base_was_trained_in_the_same_run_or_before(tmp_path, engine):
    """What makes ``train.py --seed N`` recreate its files bit for bit (at the torch version and thread
    count it records in them): each LoRA's data stream and initialisation depend only on the seed and
    the concept, and it learns on the base as saved."""
    import shutil

    from quality import train

    full, split = tmp_path / "full", tmp_path / "split"
    tiny = ["--seed", "3", "--lora-steps", "2"]
    train.main([*tiny, "--out", str(full), "--base-steps", "2", "--concepts", "ruby-disk,lemon-stripe"])
    split.mkdir()
    shutil.copy(full / toy_model.BASE_FILE, split / toy_model.BASE_FILE)
    train.main([*tiny, "--out", str(split), "--reuse-base", "--concepts", "lemon-stripe"])

    lemon = toy_model.lora_file(world.CONCEPTS_BY_NAME["lemon-stripe"])
    once, again = (safetensors.torch.load_file(str(folder / lemon)) for folder in (full, split))
    assert once.keys() == again.keys() and all(torch.equal(once[k], again[k]) for k in once)
    assert any(v.abs().sum() > 0 for k, v in once.items() if "up" in k), "two steps should move the up factors"
    assert not (split / toy_model.lora_file(world.CONCEPTS_BY_NAME["ruby-disk"])).exists()
    for path in (full / toy_model.BASE_FILE, split / lemon):
        with safetensors.safe_open(str(path), "pt") as opened:
            metadata = opened.metadata()
        assert metadata["training_seed"] == "3" and metadata["torch_threads"] == str(torch.get_num_threads())
        assert metadata["torch_version"] == torch.__version__

    with pytest.raises(SystemExit, match="unknown concepts"):
        train.main(["--out", str(split), "--concepts", "ruby"])
    with pytest.raises(SystemExit, match=r"no toy-base\.safetensors"):
        train.main(["--out", str(tmp_path / "empty"), "--reuse-base"])


def test_bad_method_and_size_options_are_refused_with_what_to_pass():
    from quality.harness import parse_methods, parse_sizes

    assert parse_methods("merge, loratorio") == ["merge", "loratorio"] and parse_sizes("2,4") == [2, 4]
    with pytest.raises(SystemExit, match=r"unknown methods \['lora'\]; choose from merge"):
        parse_methods("merge,lora")
    for bad in ("2,x", "1,2", "6", ""):
        with pytest.raises(SystemExit, match=r"--sizes .*from 2 to 5, e\.g\. 2,3,4"):
            parse_sizes(bad)


def test_compare_runs_pairs_one_method_before_and_after_a_change(tmp_path):
    """compare_runs.py: the method's per-image difference after minus before, and a refusal for runs made unalike."""
    import subprocess
    import sys
    from pathlib import Path

    from quality.harness import Scores, write_report

    tool = Path(__file__).resolve().parent.parent / "tools" / "quality" / "compare_runs.py"
    sampling = {"scenario": "standard", "split": "test", "images": 64, "steps": 12, "seed": 1}

    def report(name: str, recall: list[float], seed: str, cfg: float = 2.0) -> Path:
        flags = [False] * len(recall)
        run = Scores("loratorio-routed", seed, ["ruby-disk", "cobalt-square"], recall, recall, flags, flags, flags)
        runs = [run]
        options = {"loratorio-routed": {"cfg": cfg}}
        write_report(tmp_path / name, runs, {**sampling, "training_seeds": [seed]}, options, "test")
        return tmp_path / name / "results.json"

    before = [report(f"before-{s}", [0.0, 0.5] * 32, f"seed-{s}") for s in range(2)]
    after = [report(f"after-{s}", [1.0, 0.5] * 32, f"seed-{s}") for s in range(2)]
    command = [sys.executable, str(tool), "--method", "loratorio-routed", "--before", *map(str, before), "--after"]
    done = subprocess.run([*command, *map(str, after)], capture_output=True, text=True, check=True)
    line = next(row for row in done.stdout.splitlines() if row.startswith("| 2 |"))
    assert line.startswith("| 2 | loratorio-routed | loratorio-routed before | +0.50 [") and line.endswith("| better |")
    unalike = [report(f"unalike-{s}", [1.0] * 64, f"seed-{s}", cfg=3.0) for s in range(2)]
    refused = subprocess.run([*command, *map(str, unalike)], capture_output=True, text=True)
    assert refused.returncode != 0 and "made alike" in refused.stderr
