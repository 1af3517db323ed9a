"""Test helpers around a running ComfyUI server (the server itself: ``tools/comfy_server.py``)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from comfy_server import RunningServer, comfyui_server, free_port

__all__ = ["RunningServer", "comfyui_server", "execution_error", "free_port", "post_json", "run_prompt"]


def post_json(server: RunningServer, path: str, payload: object, timeout: float = 30.0) -> tuple[int, object]:
    """POST JSON; returns (HTTP status, decoded body) also for error statuses."""
    request = urllib.request.Request(
        server.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def run_prompt(server: RunningServer, prompt: dict, timeout: float = 300.0) -> dict:
    """Queue an API-format prompt and wait for its history entry (``status`` says success or error)."""
    status, body = post_json(server, "/prompt", {"prompt": prompt})
    if status != 200:
        return {"rejected": body}
    prompt_id = body["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = server.get_json(f"/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            entry = history[prompt_id]
            if entry["status"].get("status_str") in ("success", "error"):
                return entry
        time.sleep(0.3)
    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")


def execution_error(entry: dict) -> str | None:
    """The exception message of a failed prompt's history entry, or None if it succeeded."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return f"{data.get('exception_type')}: {data.get('exception_message')}"
    return None
