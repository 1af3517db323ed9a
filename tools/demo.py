#!/usr/bin/env python3
"""The main job: every composition method, queued through ComfyUI's HTTP API, side by side.

    make demo                       # the pinned host and the seeded demo models
    python3 tools/host.py run -- tools/demo.py --steps 8 --seed 1 --seed 2
    python3 tools/demo.py --server http://my-gpu:8188 --checkpoint sd15.safetensors \\
        --lora character.safetensors --lora background.safetensors:0.8 --prompt "..."

Without ``--server`` it writes the demo checkpoint and LoRAs if missing, starts ComfyUI with the
pack on a free loopback port, and stops it at the end (also on Ctrl-C). Each method's API
workflow from ``workflows/api/`` runs once per seed through ``tools/comfy_client.py``; the images
and one comparison sheet (methods in columns, seeds in rows, LoRAtorio's weight maps beside) are
saved under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageDraw

TOOLS_DIR = Path(__file__).resolve().parent
PACK_DIR = TOOLS_DIR.parent
sys.path.insert(0, str(TOOLS_DIR))
from comfy_client import Job, Overrides, apply_overrides, parse_lora, run_jobs  # noqa: E402

METHODS = ("lora-merge-baseline", "lora-switch", "lora-composite", "loratorio", "loratorio-dynamic-pool")
MAIN_IMAGE_NODE, WEIGHT_MAP_NODE = "8", "9"
LABEL_HEIGHT = 22


@contextlib.contextmanager
def local_server(out_dir: Path, models_dir: Path | None) -> Iterator[str]:
    """The pinned host's ComfyUI with the demo models, on a free port, stopped on exit."""
    from comfy_server import comfyui_server
    from demo_assets import ensure_demo_assets
    from host_env import comfyui_on_path

    comfyui = comfyui_on_path("demo.py")
    models_dir = models_dir or comfyui / "models"
    ensure_demo_assets(models_dir)
    work = out_dir / "comfyui"
    work.mkdir(parents=True, exist_ok=True)
    config = work / "extra_model_paths.yaml"
    config.write_text(f"loratorio_demo:\n  base_path: {models_dir}\n  checkpoints: checkpoints\n  loras: loras\n")
    print(f"[demo] starting ComfyUI from {comfyui} (log: {work / 'server.log'})", flush=True)
    with comfyui_server(comfyui, work, extra_args=("--extra-model-paths-config", str(config))) as server:
        print(f"[demo] ComfyUI is up at {server.url}", flush=True)
        yield server.url
    print("[demo] ComfyUI stopped", flush=True)


def build_jobs(options: argparse.Namespace) -> list[Job]:
    params: dict[str, object] = {"steps": options.steps, "width": options.size, "height": options.size}
    jobs = []
    for method in METHODS:
        prompt = json.loads((PACK_DIR / "workflows" / "api" / f"{method}.json").read_text())
        for seed in options.seed:
            overrides = Overrides(options.checkpoint, options.lora, options.prompt, None, seed, params)
            jobs.append(Job(f"{method}_seed{seed}", apply_overrides(prompt, overrides)))
    return jobs


def output_of(job: Job, node: str) -> Path | None:
    return next((p for p in job.outputs if p.stem.startswith(f"{job.name}_{node}_")), None)


def comparison_sheet(jobs: list[Job], seeds: list[int], target: Path) -> Path:
    """Methods in columns, seeds in rows, LoRAtorio's weight maps in the last column."""
    by_name = {job.name: job for job in jobs}
    first = next(Image.open(p) for job in jobs if (p := output_of(job, MAIN_IMAGE_NODE)))
    cell_w, cell_h = first.size
    maps = [output_of(by_name[f"loratorio_seed{seed}"], WEIGHT_MAP_NODE) for seed in seeds]
    map_w = max((int(Image.open(p).width * cell_h / Image.open(p).height) for p in maps if p), default=0)
    sheet = Image.new("RGB", (cell_w * len(METHODS) + map_w, LABEL_HEIGHT + cell_h * len(seeds)), (20, 20, 20))
    draw = ImageDraw.Draw(sheet)
    for column, method in enumerate(METHODS):
        draw.text((column * cell_w + 4, 5), method, fill=(235, 235, 235))
    if map_w:
        draw.text((len(METHODS) * cell_w + 4, 5), "loratorio weight maps", fill=(235, 235, 235))
    for row, seed in enumerate(seeds):
        top = LABEL_HEIGHT + row * cell_h
        for column, method in enumerate(METHODS):
            path = output_of(by_name[f"{method}_seed{seed}"], MAIN_IMAGE_NODE)
            if path:
                sheet.paste(Image.open(path).convert("RGB").resize((cell_w, cell_h)), (column * cell_w, top))
        if maps[row]:
            weight_map = Image.open(maps[row]).convert("RGB")
            sheet.paste(weight_map.resize((map_w, cell_h)), (len(METHODS) * cell_w, top))
        draw.text((4, top + 4), f"seed {seed}", fill=(255, 255, 255))
    sheet.save(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", action="append", help="your ComfyUI URL(s); without it the pinned host is started")
    parser.add_argument("--checkpoint", help="checkpoint file name (default: the demo checkpoint)")
    parser.add_argument("--lora", action="append", type=parse_lora, help="NAME[:STRENGTH]; repeat (default: the demo LoRAs)")
    parser.add_argument("--prompt", help="the positive prompt (default: the workflows' prompt)")
    parser.add_argument("--seed", action="append", type=int, help="a seed; repeat for more rows (default: 1 and 2)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--size", type=int, default=256, help="image width and height in pixels")
    parser.add_argument("--out", type=Path, default=PACK_DIR / "out" / "demo", help="where the images and the sheet go")
    parser.add_argument("--models-dir", type=Path, help="where the demo models live (default: the host's models folder)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one job may take")
    options = parser.parse_args(argv)
    options.seed = options.seed or [1, 2]
    options.out = options.out.resolve()
    images_dir = options.out / "images"
    jobs = build_jobs(options)
    try:
        with contextlib.ExitStack() as stack:
            servers = options.server or [stack.enter_context(local_server(options.out, options.models_dir))]
            run_jobs(jobs, servers, images_dir, timeout=options.timeout)
    except KeyboardInterrupt:
        print("\n[demo] interrupted", file=sys.stderr)
        return 130
    failed = [job for job in jobs if job.error]
    if len(failed) == len(jobs):
        print(f"[demo] every job failed; the first error:\n{failed[0].error}", file=sys.stderr)
        return 1
    sheet = comparison_sheet([j for j in jobs if not j.error], options.seed, options.out / "comparison.png")
    print(f"[demo] {len(jobs) - len(failed)} of {len(jobs)} jobs done; images in {images_dir}")
    print(f"[demo] comparison sheet: {sheet}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
