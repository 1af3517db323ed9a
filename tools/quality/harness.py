#!/usr/bin/env python3
"""Score composition methods in the toy world: every combination of concepts, each method through
the pack's own nodes in real ComfyUI sampling, every image checked by the detector.

    python3 tools/host.py run -- tools/quality/harness.py [--models DIR ...] [--images 64] [--steps 12]
        [--sizes 2,3,4] [--methods merge,switch,composite,loratorio] [--out out/quality]

For each training seed (a folder written by ``train.py``), each combination of N concepts and each
method, one sampling call generates ``--images`` images (one latent batch, so each image has its own
noise) for the prompt made of the concepts' trigger words. Each concept alone gives two controls:
its trigger word without any LoRA (the floor) and its LoRA merged at strength 1 (the ceiling).
Reported per method and N, with 95% bootstrap intervals (training seeds resampled, then images):
element recall (shape-checked and colour-only), the rate of images with every element, of empty
images (no concept at all) and of images with a concept that was not asked for. Writes
``summary.json`` (the table's numbers), ``results.json`` (with every image's scores),
``results.md`` and ``grid.png`` under ``--out``. ``--compare`` checks the means against another
run's ``summary.json``, e.g. a fresh training run's against the shipped models'.

``--scenario`` picks the combinations: ``standard`` (the five concepts, split into tuning and test
combinations), ``same-class`` (two character LoRAs trained on one class word, ``jade disk`` and
``aqua disk``, alone and with the stripe and the style: merging them interferes) or ``regions``
(two-subject scenes, each subject confined to its half of the image by LoRA Region Mask: ruby's
disk left of cobalt's square, jade left of aqua, each pair alone and with the style; each image
also scores whether each subject is in its own half, and whether its colour bleeds into the
other). The method ``loratorio-masks`` (single pass from the masks alone) needs regions. The method
``loratorio-styles-merged`` merges the style concepts into the model (the LoRA Merge node, strength
1) and composes the others with LoRAtorio, with the three options beyond the paper: what a user does
by putting style LoRAs in a LoRA Merge (or LoraLoader) before the LoRAtorio Sampler.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODELS_DIR = Path(__file__).resolve().parent / "models"
METHODS = (
    "merge",
    "switch",
    "composite",
    "loratorio",
    "loratorio-routed",
    "loratorio-masks",
    "loratorio-styles-merged",
    "loratorio-styles-found",
)
CHALLENGERS = ("loratorio", "loratorio-routed", "loratorio-masks", "loratorio-styles-merged", "loratorio-styles-found")
SCENARIOS = ("standard", "same-class", "regions")
NEEDS_REGIONS = ("loratorio-masks",)
# Each method's starting settings; tune.py chooses them on the tuning combinations and freezes its
# choice in SETTINGS_FILE, which the harness uses when it exists.
DEFAULT_SETTINGS = {
    "merge": {"cfg": 3.0, "strength": 1.0},
    "switch": {"cfg": 3.0, "tau": 2},
    "composite": {"cfg": 3.0},
    "loratorio": {"cfg": 3.0, "patch_size": 2, "temperature": 0.05, "recentre_lambda": 0.5},
    # single pass: LoRAtorio's settings with a third of the 12 steps full (every third one)
    "loratorio-routed": {
        "cfg": 2.0, "patch_size": 4, "temperature": 0.05, "recentre_lambda": 0.5,
        "routing": "single pass", "full_steps": 2, "refresh_every": 3,
    },
    # single pass with the routing map from the regions alone: 2 rows on every step
    "loratorio-masks": {
        "cfg": 2.0, "patch_size": 4, "temperature": 0.05, "recentre_lambda": 0.5,
        "routing": "single pass", "full_steps": 0, "refresh_every": 0,
    },
    # the styles merged into the model, the other concepts composed by LoRAtorio with its options
    "loratorio-styles-merged": {
        "cfg": 2.0, "patch_size": 4, "temperature": 0.05, "recentre_lambda": 0.5,
        "temperature_scaling": "by LoRA count and noise level", "patch_layout": "sliding",
        "routing_memory": "steps so far",
    },
    # every concept given to LoRAtorio with the three options; it finds the styles and applies them everywhere
    "loratorio-styles-found": {
        "cfg": 2.0, "patch_size": 4, "temperature": 0.05, "recentre_lambda": 0.5,
        "temperature_scaling": "by LoRA count and noise level", "patch_layout": "sliding",
        "routing_memory": "steps so far", "style_loras": "applied everywhere",
    },
}  # fmt: skip
SETTINGS_FILE = Path(__file__).resolve().parent / "method_settings.json"
SAMPLING = {"cfg": 3.0, "sampler_name": "euler", "scheduler": "normal", "steps": 12}
BOOTSTRAP_SAMPLES = 1000


def frozen_settings() -> tuple[dict[str, dict], str]:
    """Each method's settings (tuned ones from ``SETTINGS_FILE``, else the defaults) and a line saying which."""
    tuned = json.loads(SETTINGS_FILE.read_text())["settings"] if SETTINGS_FILE.exists() else {}
    settings = {method: tuned.get(method, DEFAULT_SETTINGS[method]) for method in METHODS}
    untuned = [method for method in METHODS if method not in tuned]
    source = "all tuned by tune.py" if not untuned else f"defaults, not tuned, for {', '.join(untuned)}"
    return settings, source


@dataclass
class Scores:
    """Per-image results of one (training seed, combination, method) run."""

    method: str
    training_seed: str
    concepts: list[str]
    recall: list[float] = field(default_factory=list)
    colour_recall: list[float] = field(default_factory=list)
    all_present: list[bool] = field(default_factory=list)
    empty: list[bool] = field(default_factory=list)
    wrong: list[bool] = field(default_factory=list)
    # with regions: the share of the regional concepts drawn inside their own region, and whether
    # any one's colour bleeds out of it
    placed: list[float] = field(default_factory=list)
    bleed: list[bool] = field(default_factory=list)


def score_images(images, concepts: list[str], scores: Scores, regions: dict | None = None) -> None:
    """Score each image for ``concepts``; ``regions`` (concept name to ``[H, W]`` mask) adds placement."""
    from quality.detector import colour_masks, detect_in, placement
    from quality.world import CONCEPTS_BY_NAME

    expected = set(concepts)
    regional = [name for name in concepts if name in (regions or {})]
    inside = {name: regions[name].numpy() > 0.5 for name in regional}
    for image in images:
        masks = colour_masks(image.astype("float32"))
        found = detect_in(masks)
        scores.recall.append(len(expected & found.present) / len(expected))
        scores.colour_recall.append(len(expected & found.colour_present) / len(expected))
        scores.all_present.append(expected <= found.present)
        scores.empty.append(not found.colour_present)
        scores.wrong.append(bool(found.colour_present - expected))
        if regional:
            placements = [placement(masks[name], CONCEPTS_BY_NAME[name], inside[name]) for name in regional]
            scores.placed.append(sum(placed for placed, _ in placements) / len(regional))
            scores.bleed.append(any(bled for _, bled in placements))


class ToyRun:
    """One training seed's models, sampled through the pack's nodes."""

    def __init__(self, pack, seed_dir: Path, images: int, steps: int):
        from quality import toy_model

        self.pack, self.images, self.steps, self.folder = pack, images, steps, seed_dir
        self.model, self.table = toy_model.load_base(seed_dir / toy_model.BASE_FILE)

    @property
    def name(self) -> str:
        """The training seed's folder name (``seed-0``)."""
        return self.folder.name

    def _use_own_loras(self) -> None:
        """Point ComfyUI's ``loras`` folder at this seed's LoRAs: several runs may live in one process
        (tune.py), and each must load its own seed's files, not the last-made run's."""
        import folder_paths

        if folder_paths.folder_names_and_paths.get("loras", ([],))[0] != [str(self.folder)]:
            folder_paths.folder_names_and_paths["loras"] = ([str(self.folder)], folder_paths.supported_pt_extensions)
            folder_paths.filename_list_cache.pop("loras", None)

    def stack(self, concepts, strength: float = 1.0) -> list:
        from quality import toy_model

        return [(toy_model.lora_file(c), strength, strength) for c in concepts]

    def regional_stack(self, concepts, regions: dict, strength: float = 1.0) -> list:
        """The stack with each concept in ``regions`` confined to its mask by the LoRA Region Mask node."""
        stack = self.stack(concepts, strength)
        for position, concept in enumerate(concepts, start=1):
            if concept.name in regions:
                node = self.pack.NODE_CLASS_MAPPINGS["LoRAtorioRegionMask"]()
                (stack,) = node.set_region(stack, position, regions[concept.name][None], "hard", 4.0)
        return stack

    def generate(self, method: str, concepts, seed: int, settings: dict | None = None, regions: dict | None = None):
        """``self.images`` images of ``method`` composing ``concepts``, as ``[B, H, W, 3]`` numpy in [0, 1].

        ``settings``: the method's node inputs and ``cfg`` (default: ``DEFAULT_SETTINGS``; the controls
        base and single use ``SAMPLING``'s cfg and strength 1). ``regions``: concept name to an
        ``[H, W]`` mask, attached to the stack (Merge and Switch ignore them, as in the graph)."""
        import nodes as comfy_nodes
        import torch

        from quality import toy_model, world

        self._use_own_loras()
        positive = toy_model.conditioning(self.table, world.combination_prompt(list(concepts)))
        negative = toy_model.conditioning(self.table, [])
        latent = {"samples": torch.zeros(self.images, world.LATENT_CHANNELS, world.IMAGE_SIZE, world.IMAGE_SIZE)}
        settings = dict(DEFAULT_SETTINGS.get(method, {}) if settings is None else settings)
        cfg = settings.pop("cfg", SAMPLING["cfg"])
        ksampler = {
            "seed": seed,
            "steps": self.steps,
            "sampler_name": SAMPLING["sampler_name"],
            "scheduler": SAMPLING["scheduler"],
        }
        nodes_by_name = self.pack.NODE_CLASS_MAPPINGS
        if method in ("merge", "single", "base"):
            merged = self.model
            if method != "base":
                strength = settings.get("strength", 1.0)
                (merged, _) = nodes_by_name["LoRAtorioMerge"]().merge(self.model, self.stack(concepts, strength))
            (out,) = comfy_nodes.common_ksampler(
                merged,
                seed,
                self.steps,
                cfg,
                SAMPLING["sampler_name"],
                SAMPLING["scheduler"],
                positive,
                negative,
                latent,
            )
        else:
            node = nodes_by_name[
                {
                    "switch": "LoRAtorioSwitchSampler",
                    "composite": "LoRAtorioCompositeSampler",
                    "loratorio": "LoRAtorioSampler",
                    "loratorio-routed": "LoRAtorioSampler",
                    "loratorio-masks": "LoRAtorioSampler",
                    "loratorio-styles-merged": "LoRAtorioSampler",
                    "loratorio-styles-found": "LoRAtorioSampler",
                }[method]
            ]
            model, concepts = self.model, list(concepts)
            if method == "loratorio-styles-merged" and not all(c.is_style for c in concepts):
                styles = [c for c in concepts if c.is_style]
                if styles:
                    (model, _) = nodes_by_name["LoRAtorioMerge"]().merge(self.model, self.stack(styles))
                concepts = [c for c in concepts if not c.is_style]
            stack = self.regional_stack(concepts, regions or {}, settings.pop("strength", 1.0))
            extra = {"top_k": 0, "top_k_mode": "image", **settings} if method.startswith("loratorio") else dict(settings)
            result = node().sample(model, positive, negative, stack, cfg, latent, denoise=1.0, **ksampler, **extra)
            out = (result["result"] if isinstance(result, dict) else result)[0]
        return world.as_images(out["samples"]).numpy()


# The combinations methods are tuned on (the test split is every other one): three pairs, three
# triples and two quadruples in which each concept appears four or five times, so no concept weighs
# more than the others in the choice of settings.
TUNING_COMBINATIONS = (
    ("ruby-disk", "amber-triangle"),
    ("ruby-disk", "cobalt-square"),
    ("lemon-stripe", "dusk-style"),
    ("ruby-disk", "amber-triangle", "cobalt-square"),
    ("ruby-disk", "amber-triangle", "lemon-stripe"),
    ("amber-triangle", "cobalt-square", "dusk-style"),
    ("ruby-disk", "cobalt-square", "lemon-stripe", "dusk-style"),
    ("amber-triangle", "cobalt-square", "lemon-stripe", "dusk-style"),
)


# The other scenarios' combinations, all held out (no setting was chosen on them). same-class: the
# two characters alone, beside the stripe that crosses them, beside the style, and with both.
# regions: two subjects of two classes, then of one class, each alone and with the global style.
SCENARIO_COMBINATIONS = {
    "same-class": (
        ("jade-disk", "aqua-disk"),
        ("jade-disk", "aqua-disk", "lemon-stripe"),
        ("jade-disk", "aqua-disk", "dusk-style"),
        ("jade-disk", "aqua-disk", "lemon-stripe", "dusk-style"),
    ),
    "regions": (
        ("ruby-disk", "cobalt-square"),
        ("jade-disk", "aqua-disk"),
        ("ruby-disk", "cobalt-square", "dusk-style"),
        ("jade-disk", "aqua-disk", "dusk-style"),
    ),
}
LEFT_SUBJECTS, RIGHT_SUBJECTS = ("ruby-disk", "jade-disk"), ("cobalt-square", "aqua-disk")


def subject_regions() -> dict:
    """The regions scenario's masks, by concept: the left half of the image or the right half."""
    import torch

    from quality.world import IMAGE_SIZE

    left = torch.zeros(IMAGE_SIZE, IMAGE_SIZE)
    left[:, : IMAGE_SIZE // 2] = 1.0
    return {**dict.fromkeys(LEFT_SUBJECTS, left), **dict.fromkeys(RIGHT_SUBJECTS, 1.0 - left)}


def combinations(sizes: list[int], split: str = "all", scenario: str = "standard") -> list[tuple]:
    """Every combination of ``sizes`` concepts; ``split`` keeps the tuning ones (``TUNING_COMBINATIONS``,
    on which method settings are chosen) or the held-out test rest. The other scenarios'
    ``SCENARIO_COMBINATIONS`` are all held out."""
    from quality.world import CONCEPTS, CONCEPTS_BY_NAME

    if scenario != "standard":
        listed = SCENARIO_COMBINATIONS[scenario]
        held_out = [tuple(CONCEPTS_BY_NAME[n] for n in names) for names in listed if len(names) in sizes]
        return [] if split == "tune" else held_out
    every = [combo for n in sizes for combo in itertools.combinations(CONCEPTS, n)]
    if split == "all":
        return every
    return [combo for combo in every if (tuple(c.name for c in combo) in TUNING_COMBINATIONS) == (split == "tune")]


def bootstrap_interval(per_seed: list[list[float]], generator) -> tuple[float, float, float]:
    """Mean and 95% interval, resampling training seeds, then images within each."""
    import numpy as np

    arrays = [np.asarray(values, dtype=float) for values in per_seed if len(values)]
    mean = float(np.mean(np.concatenate(arrays)))
    means = []
    for _ in range(BOOTSTRAP_SAMPLES):
        chosen = [arrays[i] for i in generator.integers(0, len(arrays), len(arrays))]
        means.append(np.mean(np.concatenate([a[generator.integers(0, len(a), len(a))] for a in chosen])))
    low, high = np.percentile(means, [2.5, 97.5])
    return mean, float(low), float(high)


def summarise(runs: list[Scores]) -> list[dict]:
    import numpy as np

    generator = np.random.default_rng(0)
    rows = []
    order = ("base", "single", *METHODS)
    keys = sorted({(r.method, len(r.concepts)) for r in runs}, key=lambda k: (k[1], order.index(k[0])))
    for method, size in keys:
        group = [r for r in runs if r.method == method and len(r.concepts) == size]
        seeds = sorted({r.training_seed for r in group})
        row = {
            "method": method,
            "n": size,
            "combinations": len({tuple(r.concepts) for r in group}),
            "images": sum(len(r.recall) for r in group),
        }
        regional = any(r.placed for r in group)  # the controls have no regions
        for metric in ("recall", "colour_recall", "all_present", "empty", "wrong", *(("placed", "bleed") if regional else ())):
            per_seed = [[float(v) for r in group if r.training_seed == s for v in getattr(r, metric)] for s in seeds]
            row[metric] = bootstrap_interval(per_seed, generator)
        rows.append(row)
    return rows


def paired_differences(
    runs: list[Scores], challenger: str = "loratorio", metric: str = "recall", others: list[str] | None = None
) -> list[dict]:
    """Per N and other method (``others``, default every method), ``challenger``'s ``metric`` minus
    the other's, image by image (the same sampling seed gives both the same starting noise), with a
    95% bootstrap interval (training seeds, then images) and a verdict: better or worse when the
    interval excludes 0, else no clear difference."""
    import numpy as np

    generator = np.random.default_rng(1)
    by_key = {(r.method, r.training_seed, tuple(r.concepts)): r for r in runs}
    rows = []
    for size in sorted({len(r.concepts) for r in runs if r.method == challenger}):
        for other in (m for m in (others or METHODS) if m != challenger):
            per_seed: dict[str, list[float]] = {}
            for (method, seed, concepts), mine in by_key.items():
                theirs = by_key.get((other, seed, concepts))
                if method == challenger and len(concepts) == size and theirs is not None:
                    difference = np.subtract(getattr(mine, metric), getattr(theirs, metric))
                    per_seed.setdefault(seed, []).extend(difference.tolist())
            if not per_seed:
                continue
            mean, low, high = bootstrap_interval(list(per_seed.values()), generator)
            verdict = "better" if low > 0 else "worse" if high < 0 else "no clear difference"
            rows.append(
                {
                    "n": size,
                    "challenger": challenger,
                    "other": other,
                    "metric": metric,
                    "difference": (mean, low, high),
                    "verdict": verdict,
                }
            )
    return rows


def markdown(rows: list[dict], header: str) -> str:
    def cell(value: tuple[float, float, float]) -> str:
        return f"{value[0]:.2f} [{value[1]:.2f}, {value[2]:.2f}]"

    regional = any("placed" in row for row in rows)
    lines = [
        header,
        "",
        "| method | N | recall (shape) | recall (colour) | all present | empty | wrong concept |"
        + (" in its region | bleeds |" if regional else "")
        + " images |",
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if regional else ""),
    ]
    for row in rows:
        placement = f" {cell(row['placed'])} | {cell(row['bleed'])} |" if "placed" in row else (" - | - |" if regional else "")
        lines.append(
            f"| {row['method']} | {row['n']} | {cell(row['recall'])} | {cell(row['colour_recall'])} | {cell(row['all_present'])} "
            f"| {cell(row['empty'])} | {cell(row['wrong'])} |{placement} {row['images']} |"
        )
    return "\n".join(lines) + "\n"


def differences_markdown(rows: list[dict]) -> str:
    metric = {"recall": "recall", "placed": "in its region"}[rows[0].get("metric", "recall")] if rows else "recall"
    lines = [
        f"| N | {metric} of | minus | difference [95% interval] | verdict |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        mean, low, high = row["difference"]
        lines.append(
            f"| {row['n']} | {row['challenger']} | {row['other']} | {mean:+.2f} [{low:+.2f}, {high:+.2f}] | {row['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def per_combination_markdown(runs: list[Scores], metric: str = "recall") -> str:
    """The mean ``metric`` of each combination (rows) and method (columns), over training seeds and images."""
    import numpy as np

    values: dict[tuple[tuple[str, ...], str], list[float]] = {}
    for run in runs:
        if run.method in METHODS:
            values.setdefault((tuple(run.concepts), run.method), []).extend(map(float, getattr(run, metric)))
    methods = [m for m in METHODS if any(method == m for _, method in values)]
    combos = sorted({combo for combo, _ in values}, key=lambda combo: (len(combo), combo))
    label = {"recall": "recall", "placed": "in its region"}[metric]
    lines = [f"| {label} per combination | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for combo in combos:
        cells = [f"{np.mean(values[combo, m]):.2f}" if values.get((combo, m)) else "-" for m in methods]
        lines.append(f"| {' + '.join(name.split('-')[0] for name in combo)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def means_beyond_tolerance(rows: list[dict], reference: list[dict], tolerance: float) -> list[str]:
    """The (method, N) rows whose mean recall or all-present rate differs from ``reference``'s by
    more than ``tolerance``, one line each; rows missing from either side are not compared."""
    expected = {(row["method"], row["n"]): row for row in reference}
    found = []
    for row in rows:
        other = expected.get((row["method"], row["n"]))
        for metric in ("recall", "all_present"):
            if other is not None and abs(row[metric][0] - other[metric][0]) > tolerance:
                found.append(f"{row['method']} N={row['n']} {metric}: {row[metric][0]:.2f}, reference {other[metric][0]:.2f}")
    return found


def save_grid(samples: dict[str, list], path: Path) -> None:
    """One row per method (and the single-LoRA row), a few images each, upscaled for viewing."""
    import numpy as np
    from PIL import Image

    scale, gap = 4, 2
    rows = list(samples.items())
    width = max(len(images) for _, images in rows)
    tile = 32 * scale
    sheet = Image.new("RGB", (width * (tile + gap), len(rows) * (tile + gap)), (40, 40, 40))
    for r, (_, images) in enumerate(rows):
        for c, image in enumerate(images):
            picture = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).resize((tile, tile), Image.NEAREST)
            sheet.paste(picture, (c * (tile + gap), r * (tile + gap)))
    sheet.save(path)


def scored(toy: ToyRun, method: str, combo, seed: int, settings: dict | None = None, regions: dict | None = None):
    """Generate ``combo`` with ``method`` and score every image: ``(Scores, images)``. ``regions``
    (concept name to mask) go to the stack and the scoring; controls (base, single) take none."""
    regions = {} if method in ("base", "single") else regions or {}
    scores = Scores(method, toy.name, [c.name for c in combo])
    images = toy.generate(method, combo, seed, settings, regions)
    score_images(images, scores.concepts, scores, regions)
    return scores, images


def parse_methods(text: str | None, scenario: str = "standard") -> list[str]:
    """``--methods``, by default every method the scenario can run (``loratorio-masks`` needs regions)."""
    available = [m for m in METHODS if scenario == "regions" or m not in NEEDS_REGIONS]
    methods = available if text is None else [m.strip() for m in text.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        sys.exit(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    regionless = sorted(set(methods) - set(available))
    if regionless:
        sys.exit(f"{', '.join(regionless)} routes by the LoRAs' regions alone; run it with --scenario regions")
    return methods


def parse_sizes(text: str) -> list[int]:
    """``--sizes``: how many concepts each combination has, each from 2 to the number of concepts."""
    from quality.world import CONCEPTS

    try:
        sizes = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(not 2 <= n <= len(CONCEPTS) for n in sizes):
        sys.exit(f"--sizes {text!r}: give comma-separated numbers of concepts from 2 to {len(CONCEPTS)}, e.g. 2,3,4")
    return sizes


def seed_folders(given: list[Path] | None) -> list[Path]:
    """The training-seed folders to score, each checked for a base model."""
    from quality.toy_model import BASE_FILE

    folders = given or sorted(MODELS_DIR.glob("seed-*"))
    if not folders:
        sys.exit(f"no trained models in {MODELS_DIR}; run tools/quality/train.py first")
    for folder in folders:
        if not (folder / BASE_FILE).is_file():
            sys.exit(f"{folder} has no {BASE_FILE}; train it with tools/quality/train.py --out {folder}")
    return folders


def generate_runs(
    pack, seed_dir: Path, options, sizes: list[int], settings: dict, methods: list[str], grid: dict
) -> list[Scores]:
    """Every control and every (combination, method) of one training seed, scored; first images go to ``grid``."""
    toy = ToyRun(pack, seed_dir, options.images, options.steps)
    combos = combinations(sizes, options.split, options.scenario)
    regions = subject_regions() if options.scenario == "regions" else {}
    runs, started = [], time.monotonic()
    for concept in dict.fromkeys(concept for combo in combos for concept in combo):
        for control in ("base", "single"):  # the trigger word without its LoRA (the floor); the LoRA alone (the ceiling)
            scores, images = scored(toy, control, [concept], options.seed)
            runs.append(scores)
            grid.setdefault(control, []).append(images[0])
    for combo in combos:
        for method in methods:
            scores, images = scored(toy, method, combo, options.seed, settings[method], regions)
            runs.append(scores)
            grid.setdefault(method, []).extend(images[:1])
        print(
            f"[quality] {seed_dir.name} {'+'.join(c.trigger for c in combo)} done ({time.monotonic() - started:.0f} s)",
            flush=True,
        )
    return runs


def read_report(path: Path) -> dict:
    """A ``summary.json`` or ``results.json`` the harness wrote, or exit saying what is wrong with it."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        sys.exit(f"cannot read {path} as a harness report ({error}); pass a summary.json or results.json under --out")
    if "rows" not in report:
        sys.exit(f"{path} is not a harness report (no 'rows'); pass a summary.json or results.json under --out")
    return report


def combined_runs(paths: list[Path]) -> tuple[list[Scores], dict, dict, str]:
    """The runs of several ``results.json`` (e.g. one per training seed, run side by side), which must
    share their sampling and settings: ``(runs, sampling, settings, settings_source)``."""
    loaded = [(path, read_report(path)) for path in paths]
    for path, report in loaded:
        if "runs" not in report:
            sys.exit(f"{path} has no per-image runs; --combine needs results.json files, not summary.json")
    first_path, first = loaded[0]

    def options_of(report: dict) -> tuple[dict, dict]:
        return {k: v for k, v in report["sampling"].items() if k != "training_seeds"}, report["settings"]

    for path, other in loaded[1:]:
        if options_of(other) != options_of(first):
            sys.exit(f"{path} and {first_path} differ in sampling or method settings; combine only runs made alike")
    seeds = [seed for _, report in loaded for seed in report["sampling"]["training_seeds"]]
    if len(seeds) != len(set(seeds)):
        sys.exit(f"a training seed appears in more than one of the combined results: {sorted(seeds)}")
    runs = [Scores(**run) for _, report in loaded for run in report["runs"]]
    return runs, {**first["sampling"], "training_seeds": seeds}, first["settings"], first["settings_source"]


def write_report(out: Path, runs: list[Scores], sampling: dict, settings: dict, settings_source: str) -> tuple[str, list[dict]]:
    """``summary.json``, ``results.json`` and ``results.md`` under ``out``; returns the Markdown and the rows."""
    challengers = [m for m in CHALLENGERS if any(r.method == m for r in runs)]
    metric = "placed" if any(r.placed for r in runs) else "recall"
    rows, compared = summarise(runs), [row for c in challengers for row in paired_differences(runs, c, metric)]
    methods = [m for m in METHODS if any(r.method == m for r in runs)]
    described = "; ".join(f"{m}: " + ", ".join(f"{k} {v}" for k, v in settings[m].items()) for m in methods)
    header = (
        f"Toy-world composition quality ({sampling.get('scenario', 'standard')} scenario, {sampling['split']} combinations): "
        f"{len(sampling['training_seeds'])} training "
        f"seed(s), {sampling['images']} images per combination, {sampling['steps']} {SAMPLING['sampler_name']} steps; "
        f"mean [95% bootstrap interval]. Method settings ({settings_source}): {described}; controls at cfg "
        f"{SAMPLING['cfg']}. At N = 1, base = the trigger word without its LoRA (the floor), single = the LoRA "
        "alone (the ceiling)."
    )
    summary = {
        "header": header,
        "sampling": sampling,
        "settings": settings,
        "settings_source": settings_source,
        "rows": rows,
        "loratorio_versus": compared,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "results.json").write_text(json.dumps({**summary, "runs": [asdict(r) for r in runs]}))
    table = markdown(rows, header) + "\n" + differences_markdown(compared) + "\n" + per_combination_markdown(runs, metric)
    (out / "results.md").write_text(table)
    return table, rows


def add_generation_arguments(parser: argparse.ArgumentParser, images: int) -> None:
    """The options the harness and tune.py share: which models, how many images, steps, methods."""
    parser.add_argument(
        "--models", type=Path, nargs="*", help="training-seed folders (default: every tools/quality/models/seed-*)"
    )
    parser.add_argument("--images", type=int, default=images, help="images per combination, method and training seed")
    parser.add_argument("--steps", type=int, default=SAMPLING["steps"])
    parser.add_argument("--methods", help=f"comma-separated, from {', '.join(METHODS)} (default: all the scenario can run)")


def main() -> int:
    from host_env import comfyui_on_path, load_pack

    comfyui_on_path("quality/harness.py")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_arguments(parser, images=64)
    parser.add_argument("--sizes", default="2,3,4", help="numbers of concepts to combine")
    parser.add_argument(
        "--split", choices=("test", "tune", "all"), default="test", help="which combinations (see combinations())"
    )
    parser.add_argument("--scenario", choices=SCENARIOS, default="standard", help="which concepts to combine (see above)")
    parser.add_argument("--seed", type=int, default=1, help="the sampling seed (each image of the batch gets its own noise)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent.parent / "out" / "quality")
    parser.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        help="generate nothing: report the runs of these results.json files together (e.g. one per training seed)",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        help="a summary.json to compare with (e.g. the shipped models' in tools/quality/reference/); exit 1 if they differ",
    )
    parser.add_argument("--tolerance", type=float, default=0.1, help="largest difference of a mean allowed by --compare")
    options = parser.parse_args()
    reference = read_report(options.compare)["rows"] if options.compare else None
    if options.combine:
        runs, sampling, settings, settings_source = combined_runs(options.combine)
    else:
        methods, sizes = parse_methods(options.methods, options.scenario), parse_sizes(options.sizes)
        if not combinations(sizes, options.split, options.scenario):
            sys.exit(f"the {options.scenario} scenario has no {options.split} combinations of {options.sizes} concepts")
        seed_dirs = seed_folders(options.models)
        pack = load_pack()
        import comfy.utils

        comfy.utils.PROGRESS_BAR_ENABLED = False
        settings, settings_source = frozen_settings()
        runs, grid = [], {}
        for seed_dir in seed_dirs:
            runs += generate_runs(pack, seed_dir, options, sizes, settings, methods, grid)
        sampling = {
            "scenario": options.scenario,
            "split": options.split,
            "images": options.images,
            "steps": options.steps,
            "seed": options.seed,
            "training_seeds": [folder.name for folder in seed_dirs],
        }
        options.out.mkdir(parents=True, exist_ok=True)
        save_grid({method: images[:12] for method, images in grid.items()}, options.out / "grid.png")
    table, rows = write_report(options.out, runs, sampling, settings, settings_source)
    print(table)
    if reference is not None:
        differing = means_beyond_tolerance(rows, reference, options.tolerance)
        for line in differing:
            print(f"[quality] differs from {options.compare}: {line}")
        print(f"[quality] {len(differing)} of the compared means differ by more than {options.tolerance}")
        return 1 if differing else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
