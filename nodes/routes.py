"""HTTP routes the graph editor extension (``web/js``) calls."""

from __future__ import annotations

import sys
from pathlib import Path

import folder_paths
from aiohttp import web

from ..loratorio_comfy.lora_metadata import MetadataError, read_metadata, trigger_words

LORA_INFO_ROUTE = "/loratorio/lora_info"


async def lora_info(request: web.Request) -> web.Response:
    """``GET /loratorio/lora_info?name=<lora name>``: the LoRA's trigger words from its metadata."""
    name = request.query.get("name", "")
    if not name:
        return web.json_response({"error": "Pass the LoRA file name as ?name=<file name>."}, status=400)
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        return web.json_response({"name": name, "error": f"LoRA '{name}' is not in any loras folder."}, status=404)
    try:
        words, source = trigger_words(read_metadata(Path(path)))
    except (MetadataError, OSError) as error:
        return web.json_response({"name": name, "trigger_words": [], "error": str(error)}, status=422)
    return web.json_response({"name": name, "trigger_words": words, "source": source})


def register() -> bool:
    """Add the routes to the running server; False when there is none (the pack imported outside a server)."""
    server = sys.modules.get("server")  # main.py imports it before loading custom nodes; never import it here
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    instance.routes.get(LORA_INFO_ROUTE)(lora_info)
    return True
