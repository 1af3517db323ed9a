"""HTTP routes the graph editor extension (``web/js``) calls."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import folder_paths
from aiohttp import web

from ..loratorio_comfy.lora_metadata import MetadataError, read_metadata, trigger_words

LORA_INFO_ROUTE = "/loratorio/lora_info"


def lora_trigger_words(path: Path) -> tuple[list[str], str | None]:
    """Read off the server's event loop: a header can be megabytes of JSON."""
    try:
        return trigger_words(read_metadata(path))
    except OSError as error:  # its text holds the absolute path, which must not reach the client
        raise MetadataError(f"{path.name} cannot be read ({error.strerror or type(error).__name__})") from None


async def lora_info(request: web.Request) -> web.Response:
    """``GET /loratorio/lora_info?name=<lora name>``: the LoRA's trigger words from its metadata.

    Every answer is ``{"name", "trigger_words", "source", "error"}`` (``error`` None on success);
    names are relative to ComfyUI's loras folders."""
    name = request.query.get("name", "")
    answer: dict[str, object] = {"name": name, "trigger_words": [], "source": None, "error": None}
    if not name:
        return web.json_response({**answer, "error": "Pass the LoRA file name as ?name=<file name>."}, status=400)
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        return web.json_response({**answer, "error": f"LoRA '{name}' is not in any loras folder."}, status=404)
    try:
        words, source = await asyncio.get_running_loop().run_in_executor(None, lora_trigger_words, Path(path))
    except MetadataError as error:
        return web.json_response({**answer, "error": str(error)}, status=422)
    return web.json_response({**answer, "trigger_words": words, "source": source})


def register() -> bool:
    """Add the routes to the running server; False when there is none (the pack imported outside a server)."""
    server = sys.modules.get("server")  # main.py imports it before loading custom nodes; never import it here
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    instance.routes.get(LORA_INFO_ROUTE)(lora_info)
    return True
