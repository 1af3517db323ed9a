#!/usr/bin/env python3
"""A ComfyUI server with the toy world of ``tools/quality``: its config and its workflows.

    python3 tools/host.py run -- tools/toy_world.py config --out out/serve
    python3 tools/host.py run -- tools/toy_world.py templates --server http://127.0.0.1:8188

``config`` writes ``extra_model_paths.yaml`` (pass it to ComfyUI's ``--extra-model-paths-config``)
that loads the demo-only nodes of ``tools/demo_nodes`` and lists the concept LoRAs (the trained
``toy-*.safetensors`` but the base) as ``loras``. ``templates`` writes the graph-editor templates
the demo nodes ship (``tools/demo_nodes/loratorio_toy_world/example_workflows/``) from the API
graphs below, with the server's ``/object_info``, and a picture of each run.

Every method uses the settings tuned for it in ``tools/quality/method_settings.json`` and the
harness's 12 euler steps; the concept LoRAs go through the pack's Multi-LoRA Loader.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS_DIR))
from comfy_client import NEGATIVE_TITLE, POSITIVE_TITLE, Job, http_json, run_jobs  # noqa: E402
from make_workflows import api_to_ui, loader_inputs, with_node_defaults  # noqa: E402
from quality.world import CONCEPTS  # noqa: E402

DEMO_NODES_DIR = TOOLS_DIR / "demo_nodes"
TEMPLATES_DIR = DEMO_NODES_DIR / "loratorio_toy_world" / "example_workflows"
MODELS_DIR = TOOLS_DIR / "quality" / "models" / "seed-0"
SETTINGS_FILE = TOOLS_DIR / "quality" / "method_settings.json"
BASE_FILE = "toy-base.safetensors"
TRIGGERS = {concept.name: concept.trigger for concept in CONCEPTS}  # e.g. ruby-disk: ruby
SAMPLING = {"steps": 12, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
METHODS = ("lora-merge-baseline", "lora-switch", "lora-composite", "loratorio", "loratorio-dynamic-pool")
IMAGE_NODE, WEIGHT_MAP_NODE = "8", "9"
TEMPLATE_CONCEPTS = ("ruby-disk", "lemon-stripe", "dusk-style")
TEMPLATE_SCALE = 4  # the templates' images are enlarged for the graph editor (32 -> 128 pixels)


def lora_file(concept: str) -> str:
    if concept not in TRIGGERS:
        raise ValueError(f"unknown toy concept {concept!r}; choose from {', '.join(TRIGGERS)}")
    return f"toy-{concept}.safetensors"


def write_server_config(work_dir: Path) -> Path:
    """``work_dir/extra_model_paths.yaml``: the demo nodes, and the concept LoRAs (linked into
    ``work_dir/toy-loras``, so the base model is not offered as a LoRA)."""
    loras = work_dir / "toy-loras"
    loras.mkdir(parents=True, exist_ok=True)
    for concept in TRIGGERS:
        source, link = MODELS_DIR / lora_file(concept), loras / lora_file(concept)
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing; the trained toy models ship in {MODELS_DIR}")
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    config = work_dir / "extra_model_paths.yaml"
    # JSON strings are YAML double-quoted strings: safe for any path
    config.write_text(
        f"loratorio_toy_world:\n  custom_nodes: {json.dumps(str(DEMO_NODES_DIR))}\n  loras: {json.dumps(str(loras))}\n"
    )
    return config


def method_settings() -> dict[str, dict]:
    return json.loads(SETTINGS_FILE.read_text())["settings"]


def graph(method: str, concepts: list[str], seed: int, scale: int = 1) -> dict:
    """The API prompt of one method composing ``concepts`` (their LoRAs, their trigger words)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    settings = method_settings()
    key = {"lora-merge-baseline": "merge", "lora-switch": "switch", "lora-composite": "composite"}.get(method, "loratorio")
    params = dict(settings[key])
    cfg = params.pop("cfg")
    strength = params.pop("strength", 1.0)
    loras = [(lora_file(concept), strength) for concept in concepts]
    prompt = " ".join(TRIGGERS[concept] for concept in concepts)
    nodes = {
        "1": {"class_type": "ToyWorldLoader", "inputs": {"base": BASE_FILE}},
        "2": {"class_type": "ToyWorldPrompt", "inputs": {"text": prompt, "base": BASE_FILE}, "_meta": {"title": POSITIVE_TITLE}},
        "3": {"class_type": "ToyWorldPrompt", "inputs": {"text": "", "base": BASE_FILE}, "_meta": {"title": NEGATIVE_TITLE}},
        "4": {"class_type": "EmptyToyLatent", "inputs": {"batch_size": 1}},
        "5": {"class_type": "LoRAtorioMultiLoRALoader", "inputs": loader_inputs(loras)},
        "7": {"class_type": "ToyLatentToImage", "inputs": {"samples": ["6", 0], "scale": scale}},
        IMAGE_NODE: {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": f"toy-{method}"}},
    }
    sampling = {"positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": seed, "cfg": cfg, **SAMPLING}
    if method == "lora-merge-baseline":
        nodes["10"] = {"class_type": "LoRAtorioMerge", "inputs": {"model": ["1", 0], "lora_stack": ["5", 0]}}
        nodes["6"] = {"class_type": "KSampler", "inputs": {"model": ["10", 0], **sampling}}
        return nodes
    sampler = {"lora-switch": "LoRAtorioSwitchSampler", "lora-composite": "LoRAtorioCompositeSampler"}.get(
        method, "LoRAtorioSampler"
    )
    nodes["6"] = {"class_type": sampler, "inputs": {"model": ["1", 0], "lora_stack": ["5", 0], **sampling, **params}}
    if sampler == "LoRAtorioSampler":
        # the dynamic pool keeps, per step, the adapters that depart most from the base model
        top_k = max(1, len(concepts) - 1) if method == "loratorio-dynamic-pool" else 0
        nodes["6"]["inputs"].update(top_k=top_k, top_k_mode="image")
        nodes[WEIGHT_MAP_NODE] = {
            "class_type": "SaveImage",
            "inputs": {"images": ["6", 1], "filename_prefix": f"toy-{method}-weightmaps"},
        }
    return nodes


def write_templates(server: str) -> None:
    """The graph-editor templates (one per method) and their pictures, from ``graph`` and the server."""
    from PIL import Image

    object_info = http_json(f"{server}/object_info")
    TEMPLATES_DIR.mkdir(parents=True, exist_ok=True)
    prompts = {
        f"toy-{method}": with_node_defaults(graph(method, list(TEMPLATE_CONCEPTS), seed=1, scale=TEMPLATE_SCALE), object_info)
        for method in METHODS
    }
    for name, prompt in prompts.items():
        (TEMPLATES_DIR / f"{name}.json").write_text(json.dumps(api_to_ui(prompt, object_info), indent=2) + "\n")
        print(f"wrote {(TEMPLATES_DIR / name).relative_to(TOOLS_DIR.parent)}.json")
    with tempfile.TemporaryDirectory() as scratch:
        for job in run_jobs([Job(name, prompt) for name, prompt in prompts.items()], [server], Path(scratch)):
            if job.error:
                raise SystemExit(f"{job.name} failed on the server: {job.error}")
            (picture,) = [path for path in job.outputs if path.stem.startswith(f"{job.name}_{IMAGE_NODE}_")]
            with Image.open(picture) as image:
                image.convert("RGB").save(TEMPLATES_DIR / f"{job.name}.jpg", quality=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    config = sub.add_parser("config", help="write extra_model_paths.yaml for a ComfyUI with the toy world")
    config.add_argument("--out", type=Path, required=True, help="folder for the config and the LoRA links")
    templates = sub.add_parser("templates", help="write the toy templates from a running server with the toy world")
    templates.add_argument("--server", default="http://127.0.0.1:8188")
    options = parser.parse_args(argv)
    if options.command == "config":
        print(write_server_config(options.out.resolve()))
    else:
        write_templates(options.server.rstrip("/"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
