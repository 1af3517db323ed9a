"""The demo in the toy world: every method composes trained concept LoRAs, and the detector says
which concepts each image shows.

``tools/demo.py`` runs it by default. Each (combination, method, seed) is one API job built by
``toy_world.graph`` (the toy nodes of ``tools/demo_nodes`` and the pack's own nodes); the 32x32
images are checked by ``tools/quality/detector.py`` and written enlarged, with a comparison sheet
(one block per combination: methods in columns, seeds in rows, the detector's verdict under each
image, LoRAtorio's weight maps beside) and ``summary.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from comfy_client import Job
from PIL import Image, ImageDraw
from quality.detector import detect
from toy_world import IMAGE_NODE, METHODS, TRIGGERS, WEIGHT_MAP_NODE, graph

DEFAULT_COMBINATIONS = (("cobalt-square", "lemon-stripe"), ("ruby-disk", "lemon-stripe", "dusk-style"))
VIEW_SCALE = 4  # 32 -> 128 pixels, nearest neighbour
CELL, VERDICT_HEIGHT, HEADER, GAP = 32 * VIEW_SCALE, 30, 22, 6
GOOD, COLOUR_ONLY, BAD, EXTRA = (120, 220, 120), (235, 225, 90), (240, 110, 110), (240, 160, 60)
TEXT, BACKGROUND = (235, 235, 235), (20, 20, 20)


@dataclass
class ImageResult:
    method: str
    seed: int
    concepts: list[str]
    found: list[str]  # by colour and shape
    found_by_colour: list[str]  # by colour alone (the shape may be too ragged for the detector)
    all_found: bool
    image: str  # the enlarged copy, relative to the output folder
    weight_maps: str | None


def parse_combination(text: str) -> tuple[str, ...]:
    """``ruby-disk+lemon-stripe`` -> the concept names, checked."""
    concepts = tuple(part.strip() for part in text.split("+") if part.strip())
    unknown = [c for c in concepts if c not in TRIGGERS]
    if len(concepts) < 2 or unknown or len(set(concepts)) != len(concepts):
        raise ValueError(
            f"--combination {text!r}: join two or more different concepts with '+', e.g. ruby-disk+lemon-stripe; "
            f"the concepts are {', '.join(TRIGGERS)}"
        )
    return concepts


def combination_key(concepts: tuple[str, ...]) -> str:
    return "+".join(TRIGGERS[c] for c in concepts)


def build_jobs(combinations: list[tuple[str, ...]], seeds: list[int], steps: int) -> list[Job]:
    jobs = []
    for concepts in combinations:
        for method in METHODS:
            for seed in seeds:
                prompt = graph(method, list(concepts), seed)
                prompt["6"]["inputs"]["steps"] = steps
                jobs.append(Job(f"{combination_key(concepts)}_{method}_seed{seed}", prompt))
    return jobs


def output_of(job: Job, node: str) -> Path | None:
    return next((p for p in job.outputs if p.stem.startswith(f"{job.name}_{node}_")), None)


def score(jobs: list[Job], combinations: list[tuple[str, ...]], seeds: list[int], out: Path) -> list[ImageResult]:
    """Detect the concepts of every job's image and save it enlarged under ``out/images``."""
    by_name = {job.name: job for job in jobs}
    results = []
    for concepts in combinations:
        for method in METHODS:
            for seed in seeds:
                job = by_name[f"{combination_key(concepts)}_{method}_seed{seed}"]
                path = output_of(job, IMAGE_NODE)
                if path is None:
                    continue
                with Image.open(path) as picture:
                    rgb = picture.convert("RGB")
                detection = detect(np.asarray(rgb, dtype=np.float32) / 255.0)
                found, by_colour = sorted(detection.present), sorted(detection.colour_present)
                view = path.with_name(f"{job.name}.png")
                rgb.resize((rgb.width * VIEW_SCALE, rgb.height * VIEW_SCALE), Image.Resampling.NEAREST).save(view)
                maps = output_of(job, WEIGHT_MAP_NODE)
                results.append(
                    ImageResult(
                        method, seed, list(concepts), found, by_colour, set(concepts) <= set(found),
                        str(view.relative_to(out)), str(maps.relative_to(out)) if maps else None,
                    )
                )  # fmt: skip
    return results


def draw_verdict(draw: ImageDraw.ImageDraw, left: int, top: int, result: ImageResult) -> None:
    """Under an image: each asked concept's trigger word, green when found, yellow when found by colour
    alone (a ragged shape), red when missing; then a verdict (orange when a concept not asked for shows)."""
    x = left + 2
    for concept in result.concepts:
        word = TRIGGERS[concept]
        colour = GOOD if concept in result.found else COLOUR_ONLY if concept in result.found_by_colour else BAD
        draw.text((x, top), word, fill=colour)
        x += round(draw.textlength(word)) + 6
    verdict, colour = verdict_of(result)
    draw.text((left + 2, top + 13), verdict, fill=colour)


def verdict_of(result: ImageResult) -> tuple[str, tuple[int, int, int]]:
    """The line under an image and its colour: green when every asked concept is found, yellow when
    the rest show by colour alone (a ragged shape; the trigger words above say which), red when one
    is missing, orange when a concept not asked for shows too."""
    asked = set(result.concepts)
    hits = len(asked & set(result.found))
    missing = asked - set(result.found_by_colour)
    extra = [TRIGGERS[c] for c in result.found if c not in asked]
    verdict = "all found" if result.all_found else f"{hits} of {len(asked)} found"
    colour = BAD if missing else EXTRA if extra else GOOD if result.all_found else COLOUR_ONLY
    return verdict + (f", also {' '.join(extra)}" if extra else ""), colour


def comparison_sheet(results: list[ImageResult], seeds: list[int], out: Path, target: Path) -> Path:
    """One block per combination: methods in columns, seeds in rows, the verdicts under the images,
    LoRAtorio's weight maps (coloured per LoRA, with a legend) beside each row."""
    blocks: dict[tuple[str, ...], dict[tuple[str, int], ImageResult]] = {}
    for result in results:
        blocks.setdefault(tuple(result.concepts), {})[(result.method, result.seed)] = result
    row_h = CELL + VERDICT_HEIGHT
    map_w = 0
    for block in blocks.values():
        for result in block.values():
            if result.method == "loratorio" and result.weight_maps:
                with Image.open(out / result.weight_maps) as maps:
                    map_w = max(map_w, round(maps.width * row_h / maps.height))
    width = len(METHODS) * (CELL + GAP) + map_w
    height = sum(HEADER * 2 + len(seeds) * row_h for _ in blocks)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    top = 0
    for concepts, block in blocks.items():
        asked = " + ".join(TRIGGERS[c] for c in concepts)
        draw.text((4, top + 5), f"prompt: {asked}   (LoRAs: {', '.join(concepts)})", fill=TEXT)
        top += HEADER
        for column, method in enumerate(METHODS):
            draw.text((column * (CELL + GAP) + 2, top + 5), method, fill=TEXT)
        draw.text((len(METHODS) * (CELL + GAP) + 2, top + 5), "loratorio weight maps (per step, one colour per LoRA)", fill=TEXT)
        top += HEADER
        for seed in seeds:
            for column, method in enumerate(METHODS):
                result = block.get((method, seed))
                if result is None:
                    continue
                left = column * (CELL + GAP)
                with Image.open(out / result.image) as picture:
                    sheet.paste(picture.convert("RGB"), (left, top))
                draw_verdict(draw, left, top + CELL + 2, result)
                if column == 0:
                    draw.text((left + 3, top + 2), f"seed {seed}", fill=TEXT)
            loratorio = block.get(("loratorio", seed))
            if loratorio and loratorio.weight_maps and map_w:
                with Image.open(out / loratorio.weight_maps) as maps:
                    scaled = maps.convert("RGB").resize((map_w, row_h), Image.Resampling.LANCZOS)
                sheet.paste(scaled, (len(METHODS) * (CELL + GAP), top))
            top += row_h
    sheet.save(target)
    return target


def recall(results: list[ImageResult], by_colour: bool = False) -> float:
    """The mean fraction of the asked concepts an image shows (``by_colour``: without the shape check)."""
    if not results:
        return 0.0
    found = [set(r.found_by_colour if by_colour else r.found) for r in results]
    return sum(len(set(r.concepts) & f) / len(r.concepts) for r, f in zip(results, found, strict=True)) / len(results)


def summary_lines(summary: dict, baseline: str = "lora-merge-baseline") -> list[str]:
    """The demo's closing lines: the methods ranked by the share of asked concepts the detector found
    (with their shape, and by colour alone), then the best against LoRA Merge, the usual way to
    stack LoRAs."""
    methods = sorted(summary["methods"].items(), key=lambda item: -item[1]["recall"])
    images = max(counts["images"] for _, counts in methods)
    lines = [f"asked concepts the detector found, {images} images per method (with their shape, by colour alone):"]
    lines += [f"  {method:<24} {counts['recall']:>4.0%} {counts['colour_recall']:>5.0%}" for method, counts in methods]
    best, best_counts = methods[0]
    merged = summary["methods"].get(baseline)
    if merged is not None and best != baseline:
        lines.append(
            f"{best} shows {best_counts['recall']:.0%} of the asked concepts, {baseline} (the LoRAs merged into the "
            f"model, the usual way) {merged['recall']:.0%}"
        )
    return lines


def write_summary(results: list[ImageResult], target: Path) -> dict:
    """``summary.json``: every image (method, seed, concepts asked and found) and, per method, the share of
    asked concepts found (with and without the shape check) and how many images showed all of them."""
    per_method = {}
    for method in METHODS:
        mine = [r for r in results if r.method == method]
        per_method[method] = {
            "images": len(mine),
            "all_found": sum(r.all_found for r in mine),
            "recall": round(recall(mine), 3),
            "colour_recall": round(recall(mine, by_colour=True), 3),
        }
    summary = {"images": [asdict(r) for r in results], "methods": per_method}
    target.write_text(json.dumps(summary, indent=1) + "\n")
    return summary
