#!/usr/bin/env python3
"""Write the example workflows: a UI-format file per method in ``example_workflows/`` (the graph editor
lists them as templates) and its API-format twin in ``example_workflows/api/`` (what ``POST /prompt`` and
``tools/comfy_client.py`` take).

    python3 tools/host.py run -- tools/make_workflows.py --server http://127.0.0.1:8188 [--thumbnails]

The API prompts below are the source; the UI layout is derived from them with the server's
``/object_info`` (widget order, output types, and the defaults of the widgets a prompt leaves out,
e.g. single pass's schedule in the workflows that run every step). Re-run after changing a node's inputs.
``--thumbnails`` also runs each workflow on the server (which needs the demo models: ``make serve``)
and saves its image as ``example_workflows/<name>.jpg``, the card picture of the templates dialog.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_client import NEGATIVE_TITLE, POSITIVE_TITLE, Job, has_control_widget, http_json, is_widget, ordered_inputs, run_jobs

WORKFLOWS_DIR = Path(__file__).resolve().parent.parent / "example_workflows"
CHECKPOINT = "loratorio-demo-sd15.safetensors"
LORAS = [
    ("demo-character-kohya.safetensors", 1.0),
    ("demo-style-peft.safetensors", 0.8),
    ("demo-background-comfy.safetensors", 1.0),
    ("demo-object-loha.safetensors", 0.9),
]
PROMPT = "a knight with a red shield in a green garden, watercolour"
NEGATIVE = "blurry, low quality"
KSAMPLER = {"seed": 1, "steps": 20, "cfg": 7.0, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0}
THUMBNAIL_SIZE = 256
LORATORIO = {
    "patch_size": 8, "temperature": 0.05, "recentre_lambda": 0.5, "top_k": 0, "top_k_mode": "image",
    "routing": "every step",
}  # fmt: skip
SINGLE_PASS_FROM_MASKS = {"routing": "single pass", "full_steps": 0, "refresh_every": 0}
# the options beyond the paper that scored best in the toy benchmark, with the style LoRAs found and merged
STYLES_FOUND = {
    "temperature_scaling": "by LoRA count and noise level", "patch_layout": "sliding", "routing_memory": "steps so far",
    "style_loras": "applied everywhere",
}  # fmt: skip


def loader_inputs(loras: list[tuple[str, float]]) -> dict:
    inputs: dict[str, object] = {}
    for slot in range(1, 9):
        name, strength = loras[slot - 1] if slot <= len(loras) else ("None", 1.0)
        inputs.update({f"lora_{slot}": name, f"strength_{slot}": strength, f"enabled_{slot}": True})
    return inputs


def base_graph(clip_source: list) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {
            "class_type": "CLIPTextEncode",
            "inputs": {"clip": clip_source, "text": PROMPT},
            "_meta": {"title": POSITIVE_TITLE},
        },
        "3": {
            "class_type": "CLIPTextEncode",
            "inputs": {"clip": clip_source, "text": NEGATIVE},
            "_meta": {"title": NEGATIVE_TITLE},
        },
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
    }


def composition(sampler: str, loras: list[tuple[str, float]], method: dict, weight_maps: bool) -> dict:
    graph = base_graph(["1", 1])
    graph["5"] = {"class_type": "LoRAtorioMultiLoRALoader", "inputs": loader_inputs(loras)}
    sampler_inputs = {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "lora_stack": ["5", 0], **KSAMPLER}
    graph["6"] = {"class_type": sampler, "inputs": {**sampler_inputs, "latent_image": ["4", 0], **method}}
    graph["7"] = {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}}
    graph["8"] = {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "loratorio"}}
    if weight_maps:
        graph["9"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 1], "filename_prefix": "loratorio-weightmaps"}}
    return graph


def merge_baseline(loras: list[tuple[str, float]]) -> dict:
    graph = base_graph(["10", 1])
    graph["5"] = {"class_type": "LoRAtorioMultiLoRALoader", "inputs": loader_inputs(loras)}
    graph["10"] = {"class_type": "LoRAtorioMerge", "inputs": {"model": ["1", 0], "lora_stack": ["5", 0], "clip": ["1", 1]}}
    ksampler = {"model": ["10", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], **KSAMPLER}
    graph["6"] = {"class_type": "KSampler", "inputs": ksampler}
    graph["7"] = {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}}
    graph["8"] = {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "loratorio-merge"}}
    return graph


def regional(loras: list[tuple[str, float]]) -> dict:
    """LoRAtorio in single pass from region masks alone: the first LoRA on the left half, the second
    on the right (SolidMask, MaskComposite and InvertMask draw the halves), 2 rows per step."""
    graph = composition("LoRAtorioSampler", loras, {**LORATORIO, **SINGLE_PASS_FROM_MASKS}, weight_maps=True)
    width, height = graph["4"]["inputs"]["width"], graph["4"]["inputs"]["height"]
    graph["11"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": width, "height": height}}
    graph["12"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": width // 2, "height": height}}
    left = {"destination": ["11", 0], "source": ["12", 0], "x": 0, "y": 0, "operation": "add"}
    graph["13"] = {"class_type": "MaskComposite", "inputs": left, "_meta": {"title": "Left half"}}
    graph["14"] = {"class_type": "InvertMask", "inputs": {"mask": ["13", 0]}, "_meta": {"title": "Right half"}}
    region = {"mode": "hard", "soft_strength": 4.0}
    graph["15"] = {
        "class_type": "LoRAtorioRegionMask",
        "inputs": {"lora_stack": ["5", 0], "lora_position": 1, "mask": ["13", 0], **region},
    }
    graph["16"] = {
        "class_type": "LoRAtorioRegionMask",
        "inputs": {"lora_stack": ["15", 0], "lora_position": 2, "mask": ["14", 0], **region},
    }
    graph["6"]["inputs"]["lora_stack"] = ["16", 0]
    return graph


def style_merged(style: tuple[str, float], subjects: list[tuple[str, float]]) -> dict:
    """The style LoRA merged into the model and CLIP (LoRA Merge), the subject LoRAs composed by
    LoRAtorio: a style wants the whole image, so it is not one of the LoRAs routed patch by patch."""
    graph = composition("LoRAtorioSampler", subjects, LORATORIO, weight_maps=True)
    graph["5"]["_meta"] = {"title": "Subject LoRAs (routed)"}
    style_loader = {"class_type": "LoRAtorioMultiLoRALoader", "inputs": loader_inputs([style])}
    graph["17"] = {**style_loader, "_meta": {"title": "Style LoRAs (merged)"}}
    graph["10"] = {"class_type": "LoRAtorioMerge", "inputs": {"model": ["1", 0], "lora_stack": ["17", 0], "clip": ["1", 1]}}
    for encoder in ("2", "3"):
        graph[encoder]["inputs"]["clip"] = ["10", 1]
    graph["6"]["inputs"]["model"] = ["10", 0]
    return graph


WORKFLOWS = {
    "loratorio": composition("LoRAtorioSampler", LORAS[:3], LORATORIO, weight_maps=True),
    "loratorio-dynamic-pool": composition("LoRAtorioSampler", LORAS, {**LORATORIO, "top_k": 2}, weight_maps=True),
    "lora-switch": composition("LoRAtorioSwitchSampler", LORAS[:3], {"tau": 5}, weight_maps=False),
    "lora-composite": composition("LoRAtorioCompositeSampler", LORAS[:3], {}, weight_maps=False),
    "lora-merge-baseline": merge_baseline(LORAS[:3]),
    "loratorio-regions": regional([LORAS[0], LORAS[2]]),
    "loratorio-style-merged": style_merged(LORAS[1], [LORAS[0], LORAS[2]]),
    "loratorio-styles-found": composition("LoRAtorioSampler", LORAS[:3], {**LORATORIO, **STYLES_FOUND}, weight_maps=True),
}


def api_to_ui(prompt: dict, object_info: dict) -> dict:
    """The graph-editor form of an API prompt: nodes in dependency columns, links, widget values."""
    depth: dict[str, int] = {}

    def column(node_id: str) -> int:
        if node_id not in depth:
            sources = [v[0] for v in prompt[node_id]["inputs"].values() if isinstance(v, list)]
            depth[node_id] = 1 + max((column(s) for s in sources), default=-1)
        return depth[node_id]

    links, nodes, rows_in_column = [], [], {}
    outputs: dict[tuple[str, int], list[int]] = {}
    for node_id in sorted(prompt, key=lambda n: (column(n), int(n))):
        spec, info = prompt[node_id], object_info[prompt[node_id]["class_type"]]
        inputs, widgets = [], []
        for section, name, input_spec in ordered_inputs(info):
            value = spec["inputs"].get(name)
            if is_widget(input_spec):
                if value is None:  # the graph editor would queue null for it, which the server refuses
                    raise ValueError(f"node {node_id} ({spec['class_type']}) has no value for its widget {name}")
                widgets.append(value)
                if has_control_widget(input_spec):
                    widgets.append("fixed")
            elif isinstance(value, list):
                link_id = len(links) + 1
                source, slot = value
                links.append([link_id, int(source), slot, int(node_id), len(inputs), input_spec[0]])
                outputs.setdefault((source, slot), []).append(link_id)
                inputs.append({"name": name, "type": input_spec[0], "link": link_id})
            elif section == "required":
                raise ValueError(f"node {node_id} ({spec['class_type']}) has no value for {name}")
            else:
                inputs.append({"name": name, "type": input_spec[0], "link": None})
        col = column(node_id)
        row = rows_in_column.get(col, 0)
        rows_in_column[col] = row + 1
        node = {
            "id": int(node_id), "type": spec["class_type"], "pos": [40 + 360 * col, 40 + 260 * row], "size": [320, 220],
            "flags": {}, "order": len(nodes), "mode": 0, "inputs": inputs, "outputs": [],
            "properties": {"Node name for S&R": spec["class_type"]}, "widgets_values": widgets,
        }  # fmt: skip
        if "_meta" in spec:
            node["title"] = spec["_meta"]["title"]
        nodes.append(node)
    for node in nodes:
        info = object_info[node["type"]]
        for slot, (kind, name) in enumerate(zip(info["output"], info["output_name"], strict=True)):
            node["outputs"].append(
                {"name": name, "type": kind, "links": outputs.get((str(node["id"]), slot), []), "slot_index": slot}
            )
    return {
        "last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
        "groups": [], "config": {}, "extra": {}, "version": 0.4,
    }  # fmt: skip


def with_node_defaults(prompt: dict, object_info: dict) -> dict:
    """``prompt`` with every widget it leaves out set to the node's default, as the editor would."""
    completed = copy.deepcopy(prompt)
    for node in completed.values():
        for _, name, spec in ordered_inputs(object_info[node["class_type"]]):
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if name not in node["inputs"] and is_widget(spec) and "default" in options:
                node["inputs"][name] = options["default"]
    return completed


def image_node(prompt: dict) -> str:
    """The id of the SaveImage node that saves the generated picture (not the weight maps)."""
    (node_id,) = [
        node_id
        for node_id, node in prompt.items()
        if node["class_type"] == "SaveImage" and "weightmaps" not in node["inputs"]["filename_prefix"]
    ]
    return node_id


def write_thumbnails(prompts: dict[str, dict], server: str, size: int = THUMBNAIL_SIZE) -> None:
    """Run every workflow on ``server`` and save its picture as ``example_workflows/<name>.jpg``."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as scratch:
        jobs = run_jobs([Job(name, prompt) for name, prompt in prompts.items()], [server], Path(scratch))
        for job in jobs:
            if job.error:
                raise SystemExit(f"{job.name} failed on the server: {job.error}")
            (picture,) = [path for path in job.outputs if path.stem.startswith(f"{job.name}_{image_node(job.prompt)}_")]
            with Image.open(picture) as image:
                thumbnail = image.convert("RGB")
                thumbnail.thumbnail((size, size))
                thumbnail.save(WORKFLOWS_DIR / f"{job.name}.jpg", quality=85)
            print(f"wrote example_workflows/{job.name}.jpg")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="a ComfyUI with this pack, for /object_info")
    parser.add_argument("--thumbnails", action="store_true", help="also run each workflow and save its picture as <name>.jpg")
    options = parser.parse_args()
    object_info = http_json(f"{options.server.rstrip('/')}/object_info")
    (WORKFLOWS_DIR / "api").mkdir(parents=True, exist_ok=True)
    prompts = {name: with_node_defaults(prompt, object_info) for name, prompt in WORKFLOWS.items()}
    for name, prompt in prompts.items():
        (WORKFLOWS_DIR / "api" / f"{name}.json").write_text(json.dumps(prompt, indent=2) + "\n")
        (WORKFLOWS_DIR / f"{name}.json").write_text(json.dumps(api_to_ui(prompt, object_info), indent=2) + "\n")
        print(f"wrote example_workflows/{name}.json and example_workflows/api/{name}.json")
    if options.thumbnails:
        write_thumbnails(prompts, options.server.rstrip("/"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
