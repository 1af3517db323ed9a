#!/usr/bin/env python3
"""The main job: every composition method, queued through ComfyUI's HTTP API, side by side.

    make demo                       # the toy world's trained concept LoRAs on the pinned host
    python3 tools/host.py run -- tools/demo.py --seed 1 --seed 2 --combination ruby-disk+amber-triangle
    python3 tools/demo.py --server http://my-gpu:8188 --checkpoint sd15.safetensors \\
        --lora character.safetensors --lora background.safetensors:0.8 --prompt "..."

By default it composes the trained concept LoRAs of the toy world (``tools/quality``): it starts
ComfyUI on a free loopback port with the demo-only toy nodes (``tools/demo_nodes``) and stops it
at the end (also on Ctrl-C); the pack's Multi-LoRA Loader loads the LoRAs and each method's node
composes them, one API job per combination, method and seed. ``tools/quality/detector.py`` says
which concepts each image shows; the enlarged images, a comparison sheet (the verdicts under the
images, LoRAtorio's weight maps beside) and ``summary.json`` are written under ``--out``.

With ``--checkpoint`` it runs each method's API workflow from ``example_workflows/api/`` instead, on your
own ComfyUI (``--server``) and models, or, without ``--server``, on the pinned host with the seeded
random-weight SD1.5 demo models of ``tools/demo_assets.py`` (abstract images: a test of the real
loaders, not of composition).
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
from comfy_client import ClientError, Job, Overrides, apply_overrides, http_json, parse_lora, run_jobs  # noqa: E402

METHODS = ("lora-merge-baseline", "lora-switch", "lora-composite", "loratorio", "loratorio-dynamic-pool")
MAIN_IMAGE_NODE, WEIGHT_MAP_NODE = "8", "9"
LABEL_HEIGHT = 22
TOY_SEEDS = [1, 2, 3, 4]
# The toy model is tiny: one torch thread avoids the threads' spin-waiting, which makes it several
# times slower on a busy two-core machine.
TOY_SERVER_ENV = {"OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def local_server(out_dir: Path, models_dir: Path | None, toy: bool) -> Iterator[str]:
    """The pinned host's ComfyUI on a free port, stopped on exit: with the toy world (``toy``), else
    with the seeded SD1.5 demo models."""
    from comfy_server import comfyui_server
    from host_env import comfyui_on_path

    comfyui = comfyui_on_path("demo.py")
    work = out_dir / "comfyui"
    work.mkdir(parents=True, exist_ok=True)
    if toy:
        from toy_world import write_server_config

        config, env = write_server_config(work), TOY_SERVER_ENV
    else:
        from demo_assets import ensure_demo_assets

        models_dir = models_dir or comfyui / "models"
        ensure_demo_assets(models_dir)
        config, env = work / "extra_model_paths.yaml", {}
        config.write_text(f"loratorio_demo:\n  base_path: {models_dir}\n  checkpoints: checkpoints\n  loras: loras\n")
    print(f"[demo] starting ComfyUI from {comfyui} (log: {work / 'server.log'})", flush=True)
    with comfyui_server(comfyui, work, extra_args=("--extra-model-paths-config", str(config)), env=env) as server:
        print(f"[demo] ComfyUI is up at {server.url}", flush=True)
        yield server.url
    print("[demo] ComfyUI stopped", flush=True)


def build_jobs(options: argparse.Namespace) -> list[Job]:
    """Each method's API workflow from ``example_workflows/api/`` per seed, with the user's models."""
    params: dict[str, object] = {"steps": options.steps, "width": options.size, "height": options.size}
    jobs = []
    for method in METHODS:
        prompt = json.loads((PACK_DIR / "example_workflows" / "api" / f"{method}.json").read_text())
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


def check_toy_nodes(server: str) -> None:
    """The toy demo needs the demo-only nodes on the server; say what to do when they are missing."""
    try:
        http_json(f"{server.rstrip('/')}/object_info/ToyWorldLoader", retries=1)["ToyWorldLoader"]
    except (ClientError, KeyError, OSError):
        raise SystemExit(
            f"{server} has no toy-world nodes; give your models with --checkpoint NAME --lora NAME[:STRENGTH] ..., or "
            "start it with the config of `python3 tools/toy_world.py config --out DIR`"
        ) from None


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", action="append", help="your ComfyUI URL(s); without it the pinned host is started")
    parser.add_argument("--checkpoint", help="run example_workflows/api/ with this checkpoint instead of the toy world")
    parser.add_argument("--lora", action="append", type=parse_lora, help="NAME[:STRENGTH]; repeat (with --checkpoint)")
    parser.add_argument("--prompt", help="the positive prompt (with --checkpoint; default: the workflows' prompt)")
    parser.add_argument("--size", type=int, default=256, help="image width and height in pixels (with --checkpoint)")
    parser.add_argument("--models-dir", type=Path, help="where the SD1.5 demo models live (with --checkpoint and no --server)")
    parser.add_argument(
        "--combination",
        action="append",
        help="toy concepts to compose, joined by '+'; repeat (default: cobalt-square+lemon-stripe and "
        "ruby-disk+lemon-stripe+dusk-style)",
    )
    parser.add_argument("--seed", action="append", type=int, help="a seed; repeat for more rows (default: 1 to 4, or 1 and 2)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=PACK_DIR / "out" / "demo", help="where the images and the sheet go")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one job may take")
    options = parser.parse_args(argv)
    toy_only, checkpoint_only = ["--combination"], ["--lora", "--prompt", "--models-dir"]
    if options.checkpoint is None and any(getattr(options, o[2:].replace("-", "_")) for o in checkpoint_only):
        parser.error(f"{', '.join(checkpoint_only)} go with --checkpoint (your own models); the toy demo takes none")
    if options.checkpoint is not None and options.combination:
        parser.error(f"{toy_only[0]} is for the toy world; with --checkpoint give your LoRAs with --lora")
    if options.checkpoint is None:
        from toy_demo import DEFAULT_COMBINATIONS, parse_combination

        try:
            options.combination = [parse_combination(c) for c in options.combination or []] or list(DEFAULT_COMBINATIONS)
        except ValueError as error:
            parser.error(str(error))
    options.seed = options.seed or (TOY_SEEDS if options.checkpoint is None else [1, 2])
    options.out = options.out.resolve()
    return options


def run(jobs: list[Job], options: argparse.Namespace, images_dir: Path) -> bool:
    """Run the jobs on the given servers or a local one; False when interrupted."""
    toy = options.checkpoint is None
    try:
        with contextlib.ExitStack() as stack:
            servers = options.server or [stack.enter_context(local_server(options.out, options.models_dir, toy))]
            if toy:
                check_toy_nodes(servers[0])
            run_jobs(jobs, servers, images_dir, timeout=options.timeout)
    except KeyboardInterrupt:
        print("\n[demo] interrupted", file=sys.stderr)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    images_dir = options.out / "images"
    if options.checkpoint is None:
        import toy_demo

        jobs = toy_demo.build_jobs(options.combination, options.seed, options.steps)
    else:
        jobs = build_jobs(options)
    if not run(jobs, options, images_dir):
        return 130
    failed = [job for job in jobs if job.error]
    if len(failed) == len(jobs):
        print(f"[demo] every job failed; the first error:\n{failed[0].error}", file=sys.stderr)
        return 1
    done = [j for j in jobs if not j.error]
    print(f"[demo] {len(done)} of {len(jobs)} jobs done; images in {images_dir}")
    if options.checkpoint is None:
        results = toy_demo.score(done, options.combination, options.seed, options.out)
        sheet = toy_demo.comparison_sheet(results, options.seed, options.out, options.out / "comparison.png")
        summary = toy_demo.write_summary(results, options.out / "summary.json")
        for line in toy_demo.summary_lines(summary):
            print(f"[demo] {line}")
        print(f"[demo] summary: {options.out / 'summary.json'}")
    else:
        sheet = comparison_sheet(done, options.seed, options.out / "comparison.png")
    print(f"[demo] comparison sheet: {sheet}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
