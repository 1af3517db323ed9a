"""Judging, comparison sheets and result files of ``tools/testbed.py``."""

from __future__ import annotations

import argparse
import csv
import json
import os
import textwrap
from pathlib import Path

import testbed_judges as judges
import testbed_sets
from testbed_jobs import Config, safe, say

CELL_MAX, CAPTION, HEADER_LINE = 256, 28, 14


def judge_images(
    config: Config, options: argparse.Namespace, records: dict[str, dict], pairs: list[tuple[str, str]]
) -> list[dict]:
    """Every (set, seed, A, B) whose two images exist, judged by ``options.judge``."""
    if options.judge == "none" or not pairs:
        return []
    vlm = judges.VlmJudge(vlm_settings(options, config.out), say) if options.judge == "vlm" else None
    detected: dict[str, judges.Scores] = {}

    def detector(cset: testbed_sets.CompositionSet, record: dict) -> judges.Scores:
        if record["image"] not in detected:
            asked = [lora.file.removeprefix("toy-").removesuffix(".safetensors") for lora in cset.loras]
            detected[record["image"]] = judges.detector_scores(config.out / record["image"], asked)
        return detected[record["image"]]

    work = [(cset, seed, a, b) for cset in config.sets for seed in config.seeds for a, b in pairs
            if f"{cset.id}|{a}|{seed}" in records and f"{cset.id}|{b}|{seed}" in records]  # fmt: skip
    judgements = []
    for index, (cset, seed, a, b) in enumerate(work, start=1):
        record_a, record_b = records[f"{cset.id}|{a}|{seed}"], records[f"{cset.id}|{b}|{seed}"]
        verdicts: list[str] = []
        if vlm:
            elements = [(lora.category, lora.name, lora.trigger) for lora in cset.loras]
            prompt = judges.eval_prompt(elements)
            scores_a, scores_b, verdicts = vlm.judge_pair(prompt, config.out / record_a["image"], config.out / record_b["image"])
            say(f"judged {index}/{len(work)} pairs ({vlm.requests} request(s) so far)")
        else:
            scores_a, scores_b = detector(cset, record_a), detector(cset, record_b)
        judgements.append({
            "set": cset.id, "n": cset.n, "seed": seed, "a": a, "b": b, "judge": options.judge,
            "a_scores": scores_a.as_dict(), "b_scores": scores_b.as_dict(), "verdicts": verdicts,
            "outcome": {d: judges.outcome(getattr(scores_a, d), getattr(scores_b, d)) for d in judges.DIMENSIONS},
        })  # fmt: skip
    return judgements


def vlm_settings(options: argparse.Namespace, out: Path) -> judges.VlmSettings:
    key = os.environ.get(options.judge_key_env)
    if not key:
        say(f"${options.judge_key_env} is not set: asking the judge without a key (fine for a local server)")
    return judges.VlmSettings(
        url=options.judge_url,
        model=options.judge_model,
        key=key,
        cache_dir=out / "judge-cache",
        per_minute=options.judge_rpm,
        retries=options.judge_retries,
        parse_retries=options.judge_parse_retries,
        temperature=options.judge_temperature,
        max_tokens=options.judge_max_tokens,
    )


def image_means(judgements: list[dict]) -> dict[tuple[str, str, int], judges.Scores]:
    """Each image's mean scores over the pairs it was judged in: (set, method, seed) -> scores."""
    sums: dict[tuple[str, str, int], list[judges.Scores]] = {}
    for j in judgements:
        for side in ("a", "b"):
            sums.setdefault((j["set"], j[side], j["seed"]), []).append(judges.Scores(**j[f"{side}_scores"]))
    return {k: judges.Scores(*(sum(getattr(s, d) for s in v) / len(v) for d in judges.DIMENSIONS)) for k, v in sums.items()}


def sheet(config: Config, cset: testbed_sets.CompositionSet, records: dict[str, dict], means: dict, target: Path) -> None:
    """Methods in columns, seeds in rows; under each image its mean judged scores."""
    from PIL import Image, ImageDraw

    paths = {(m, s): config.out / records[f"{cset.id}|{m}|{s}"]["image"]
             for m in config.methods for s in config.seeds if f"{cset.id}|{m}|{s}" in records}  # fmt: skip
    if not paths:
        return
    with Image.open(next(iter(paths.values()))) as first:
        size = first.size
    scale = CELL_MAX / max(size)
    scale = float(int(scale)) if scale >= 2 else min(scale, 1.0)  # enlarge tiny images by whole steps, shrink big ones
    cell = (round(size[0] * scale), round(size[1] * scale))
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
    width = max(len(config.methods) * (cell[0] + 4), 480)
    lines = [f"set {cset.id} (N = {cset.n})", *textwrap.wrap(f"prompt: {cset.prompt}", width=max(40, width // 6))]
    header = HEADER_LINE * (len(lines) + 1) + 4
    image = Image.new("RGB", (width, header + len(config.seeds) * (cell[1] + CAPTION)), (20, 20, 20))
    draw = ImageDraw.Draw(image)
    for row, line in enumerate(lines):
        draw.text((4, 2 + row * HEADER_LINE), line, fill=(235, 235, 235))
    for column, method in enumerate(config.methods):
        left = column * (cell[0] + 4)
        draw.text((left + 2, header - HEADER_LINE), method, fill=(235, 235, 235))
        for row, seed in enumerate(config.seeds):
            top = header + row * (cell[1] + CAPTION)
            if (method, seed) not in paths:
                draw.text((left + 4, top + 4), "missing", fill=(240, 110, 110))
                continue
            with Image.open(paths[(method, seed)]) as picture:
                image.paste(picture.convert("RGB").resize(cell, resample), (left, top))
            scores = means.get((cset.id, method, seed))
            caption = f"seed {seed}" + (f"  comp {scores.composition:.1f}  img {scores.image_quality:.1f}" if scores else "")
            draw.text((left + 2, top + cell[1] + 3), caption, fill=(200, 200, 200))
    image.save(target)


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        path.write_text("")
        return
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_results(
    config: Config, options: argparse.Namespace, records: dict, failed: list, judgements: list, table: list
) -> None:
    out = config.out
    sets = {s.id: s for s in config.sets}
    images = [{**r, "prompt": sets[r["set"]].prompt, "loras": " + ".join(lora.file for lora in sets[r["set"]].loras)}
              for r in records.values()]  # fmt: skip
    settings = {"servers": config.servers, "toy": config.toy, "checkpoint": config.checkpoint, "methods": config.methods,
                "settings": config.settings, "seeds": config.seeds, "steps": config.steps, "size": [config.width, config.height],
                "sampling": config.sampling, "negative": config.negative, "judge": options.judge,
                "judge_model": options.judge_model if options.judge == "vlm" else None}  # fmt: skip
    document = {"set_file": str(options.sets), "config": settings, "images": images,
                "failed": [{"key": t.key, "error": e} for t, e in failed], "judgements": judgements, "table": table}  # fmt: skip
    (out / "results.json").write_text(json.dumps(document, indent=1) + "\n")
    write_csv(out / "results.csv", images)
    flat = [{k: v for k, v in j.items() if k not in ("a_scores", "b_scores", "outcome", "verdicts")}
            | {f"a_{d}": j["a_scores"][d] for d in judges.DIMENSIONS} | {f"b_{d}": j["b_scores"][d] for d in judges.DIMENSIONS}
            | {f"outcome_{d}": j["outcome"][d] for d in judges.DIMENSIONS} for j in judgements]  # fmt: skip
    write_csv(out / "judgements.csv", flat)
    write_csv(out / "table.csv", table)
    (out / "table.md").write_text(judges.markdown(table) + "\n" if table else "no judged pairs\n")


def judge_and_report(config: Config, options: argparse.Namespace, records: dict, failed: list, pairs: list) -> list[dict]:
    """Judge the pairs, draw a sheet per set, write the result files; returns the win/tie/loss table."""
    judgements = judge_images(config, options, records, pairs)
    table = judges.summarise(judgements)
    means = image_means(judgements)
    (config.out / "sheets").mkdir(exist_ok=True)
    for cset in config.sets:
        sheet(config, cset, records, means, config.out / "sheets" / f"{safe(cset.id)}.png")
    write_results(config, options, records, failed, judgements, table)
    return table
