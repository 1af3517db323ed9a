#!/usr/bin/env python3
"""A headless ComfyUI client: queue workflows with overrides, follow them, download their images.

Standard library only: ComfyUI's HTTP API (``POST /prompt``, ``GET /history``, ``GET /view``,
``GET /object_info``) and its ``/ws`` websocket for progress. Jobs (workflows x seeds) are spread
over every ``--server`` given, one worker per server, which is how one grows past one GPU.

    python3 tools/comfy_client.py example_workflows/api/loratorio.json --server http://127.0.0.1:8188 \\
        --lora character.safetensors:1.0 --lora background.safetensors:0.8 \\
        --prompt "a knight in a garden" --seed 1 --seed 2 --param temperature=0.1 --out out/

Validation errors (the prompt is rejected) and execution errors (a node raised) are printed as
ComfyUI reports them, and the exit status is 1 when any job failed. A UI-format workflow (as
saved by the graph editor) is converted to the API format with the server's ``/object_info``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import json
import os
import queue
import socket
import struct
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
POSITIVE_TITLE, NEGATIVE_TITLE = "Positive prompt", "Negative prompt"


class ClientError(RuntimeError):
    """A job failed; the message is what ComfyUI reported."""


# --- HTTP ------------------------------------------------------------------------------------


def http_json(url: str, payload: object | None = None, timeout: float = 30.0, retries: int = 3) -> object:
    """GET (or POST ``payload``) JSON; connection failures are retried, HTTP errors returned as raised."""
    data = None if payload is None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    for attempt in range(retries + 1):
        try:
            request = urllib.request.Request(url, data=data, headers=headers)
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.load(response)
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            if attempt == retries:
                raise ClientError(f"{url}: no answer after {retries + 1} tries ({error})") from None
            time.sleep(min(2.0**attempt, 10.0))
    raise AssertionError("unreachable")


def download(url: str, target: Path, timeout: float = 60.0) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        target.write_bytes(response.read())


# --- a minimal websocket reader (RFC 6455), enough for ComfyUI's status messages ---------------


class WebSocket:
    def __init__(self, url: str, timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ClientError(f"{url}: the websocket handshake was cut off")
            response += chunk
        head, self._buffer = response.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ClientError(f"{url}: websocket refused: {head.splitlines()[0].decode(errors='replace')}")

    def _read(self, count: int) -> bytes:
        while len(self._buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ClientError("the websocket closed")
            self._buffer += chunk
        data, self._buffer = self._buffer[:count], self._buffer[count:]
        return data

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        header = bytes([0x80 | opcode])
        length = len(payload)
        if length < 126:
            header += bytes([0x80 | length])
        elif length < 65536:
            header += bytes([0x80 | 126]) + struct.pack("!H", length)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", length)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def receive(self) -> str | bytes:
        """The next text (str) or binary (bytes) message; answers pings on the way."""
        message, message_opcode = b"", None
        while True:
            first, second = self._read(2)
            opcode, length = first & 0x0F, second & 0x7F
            if length == 126:
                length = struct.unpack("!H", self._read(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", self._read(8))[0]
            mask = self._read(4) if second & 0x80 else None
            payload = self._read(length)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x9:
                self._send(0xA, payload)
                continue
            if opcode == 0x8:
                raise ClientError("the server closed the websocket")
            if opcode in (0x1, 0x2):
                message_opcode = opcode
            message += payload
            if first & 0x80:
                return message.decode() if message_opcode == 0x1 else message

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send(0x8, b"")
        self.sock.close()


# --- workflows: UI format to API format, and overrides -----------------------------------------


def is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def has_control_widget(spec: list) -> bool:
    """Whether the editor stores a "fixed"/"randomize" value after this widget's (a seed's) value."""
    return len(spec) > 1 and isinstance(spec[1], dict) and bool(spec[1].get("control_after_generate"))


def ordered_inputs(info: dict) -> Iterator[tuple[str, str, list]]:
    """``(section, name, spec)`` of a node type's inputs in the order the editor lays out widgets."""
    for section in ("required", "optional"):
        for name in info.get("input_order", {}).get(section, []):
            yield section, name, info["input"][section][name]


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a graph-editor workflow (nodes, links, widgets_values) to the API format."""
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4):  # muted or bypassed
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise ClientError(f"node type {node['type']!r} (node {node['id']}) is not installed on the server")
        inputs: dict[str, object] = {}
        values = list(node.get("widgets_values") or [])
        for _, name, spec in ordered_inputs(info):
            if not is_widget(spec) or not values:
                continue
            inputs[name] = values.pop(0)
            if has_control_widget(spec) and values:
                values.pop(0)
        for slot in node.get("inputs", []):
            link = links.get(slot.get("link"))
            if link is not None:
                inputs[slot["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
        if node.get("title"):
            prompt[str(node["id"])]["_meta"] = {"title": node["title"]}
    return prompt


@dataclass
class Overrides:
    checkpoint: str | None = None
    loras: list[tuple[str, float]] | None = None
    prompt: str | None = None
    negative: str | None = None
    seed: int | None = None
    params: dict[str, object] = field(default_factory=dict)
    style_loras: list[tuple[str, float]] | None = None


def style_loaders(prompt: dict) -> set[str]:
    """The Multi-LoRA Loaders (node ids) whose stack a LoRA Merge merges into the MODEL of a
    composition sampler or guider: the styles of a "styles merged, subjects routed" workflow."""
    composition = [
        node
        for node in prompt.values()
        if node["class_type"].startswith("LoRAtorio")
        and node["class_type"] != "LoRAtorioMerge"
        and "lora_stack" in node["inputs"]
    ]
    merges_feeding_composition = {
        source[0]
        for node in composition
        for source in [node["inputs"].get("model")]
        if isinstance(source, list) and prompt.get(source[0], {}).get("class_type") == "LoRAtorioMerge"
    }
    return {
        source[0]
        for merge in merges_feeding_composition
        for source in [prompt[merge]["inputs"].get("lora_stack")]
        if isinstance(source, list) and prompt.get(source[0], {}).get("class_type") == "LoRAtorioMultiLoRALoader"
    }


def set_loader_rows(inputs: dict, loras: list[tuple[str, float]]) -> None:
    for key in [k for k in inputs if k.startswith(("lora_", "strength_", "enabled_")) and k != "lora_stack"]:
        del inputs[key]
    for slot, (name, strength) in enumerate(loras, start=1):
        inputs.update({f"lora_{slot}": name, f"strength_{slot}": strength, f"enabled_{slot}": True})


def apply_overrides(prompt: dict, overrides: Overrides) -> dict:
    """A copy of an API prompt with the overrides set on the nodes they concern. ``loras`` fill the
    Multi-LoRA Loaders, ``style_loras`` those whose stack is merged before a composition sampler
    (:func:`style_loaders`), which ``loras`` leave alone."""
    prompt = copy.deepcopy(prompt)
    styles = style_loaders(prompt)
    for node_id, node in prompt.items():
        inputs, kind = node["inputs"], node["class_type"]
        title = node.get("_meta", {}).get("title")
        if overrides.checkpoint and "ckpt_name" in inputs:
            inputs["ckpt_name"] = overrides.checkpoint
        if kind == "LoRAtorioMultiLoRALoader":
            loras = overrides.style_loras if node_id in styles else overrides.loras
            if loras is not None:
                set_loader_rows(inputs, loras)
        if overrides.prompt is not None and title == POSITIVE_TITLE:
            inputs["text"] = overrides.prompt
        if overrides.negative is not None and title == NEGATIVE_TITLE:
            inputs["text"] = overrides.negative
        if overrides.seed is not None:
            for key in ("seed", "noise_seed"):
                if key in inputs and not isinstance(inputs[key], list):
                    inputs[key] = overrides.seed
        for key, value in overrides.params.items():
            if key in inputs and not isinstance(inputs[key], list):
                inputs[key] = value
    return prompt


# --- running jobs ----------------------------------------------------------------------------


@dataclass
class Job:
    name: str
    prompt: dict
    outputs: list[Path] = field(default_factory=list)
    error: str | None = None
    server: str | None = None


def format_rejection(body: object) -> str:
    """ComfyUI's validation error, verbatim: the error and every node error with its details."""
    if not isinstance(body, dict):
        return str(body)
    lines = []
    error = body.get("error")
    if isinstance(error, dict):
        lines.append(f"{error.get('message', '')}: {error.get('details', '')}".strip(": "))
    for node_id, node_error in (body.get("node_errors") or {}).items():
        for item in node_error.get("errors", []):
            lines.append(f"node {node_id} ({node_error.get('class_type')}): {item.get('message')}: {item.get('details')}")
    return "\n".join(lines) or json.dumps(body)


def progress_line(job: Job, value: int, maximum: int) -> None:
    width = 24
    filled = int(width * value / max(maximum, 1))
    sys.stderr.write(f"\r[{job.server}] {job.name:<32} [{'#' * filled}{'.' * (width - filled)}] {value}/{maximum}")
    sys.stderr.flush()


def result_images(history: dict) -> list[tuple[str, int, dict]]:
    """(node id, index, image) of the images a job saved; its previews only when it saved none.

    Nodes such as the LoRAtorio Sampler also show a preview on the node (a ``temp`` image); the
    saved (``output``) images are the results. A workflow that ends in Preview Image still gets its
    previews.
    """
    images = [
        (node_id, index, image)
        for node_id, output in history.get("outputs", {}).items()
        for index, image in enumerate(output.get("images", []))
    ]
    saved = [entry for entry in images if entry[2].get("type") == "output"]
    return saved or images


def run_job(server: str, job: Job, out_dir: Path, timeout: float, retries: int) -> None:
    """Queue one job on ``server``, follow it on the websocket, download its images."""
    job.server = server
    client_id = uuid.uuid4().hex
    ws_url = server.replace("http://", "ws://").replace("https://", "wss://") + f"/ws?clientId={client_id}"
    websocket = WebSocket(ws_url, timeout=timeout)
    try:
        try:
            queued = http_json(f"{server}/prompt", {"prompt": job.prompt, "client_id": client_id}, retries=retries)
        except urllib.error.HTTPError as error:
            body = json.loads(error.read() or b"null")
            raise ClientError(f"ComfyUI rejected the workflow:\n{format_rejection(body)}") from None
        prompt_id = queued["prompt_id"]
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise ClientError(f"no result within {timeout:.0f} s")
            message = websocket.receive()
            if isinstance(message, bytes):
                continue  # a preview image
            event = json.loads(message)
            data = event.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if event["type"] == "progress":
                progress_line(job, data["value"], data["max"])
            elif event["type"] == "execution_error":
                raise ClientError(
                    f"ComfyUI failed in node {data.get('node_id')} ({data.get('node_type')}): "
                    f"{data.get('exception_type')}: {data.get('exception_message')}"
                )
            elif event["type"] == "execution_interrupted":
                raise ClientError("the job was interrupted on the server")
            elif event["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                break
    finally:
        websocket.close()
    history = http_json(f"{server}/history/{prompt_id}", retries=retries)[prompt_id]
    for node_id, index, image in result_images(history):
        query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
        target = out_dir / f"{job.name}_{node_id}_{index}.png"
        download(f"{server}/view?{query}", target)
        job.outputs.append(target)
    sys.stderr.write(f"\r[{server}] {job.name:<32} done: {len(job.outputs)} image(s)\n")


def run_jobs(jobs: list[Job], servers: list[str], out_dir: Path, timeout: float = 600.0, retries: int = 3) -> list[Job]:
    """Run every job, spread over the servers (one worker each); returns the jobs with results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pending: queue.Queue[Job] = queue.Queue()
    for job in jobs:
        pending.put(job)

    def worker(server: str) -> None:
        while True:
            try:
                job = pending.get_nowait()
            except queue.Empty:
                return
            try:
                run_job(server, job, out_dir, timeout, retries)
            except (ClientError, OSError) as error:
                job.error = str(error)
                sys.stderr.write(f"\r[{server}] {job.name}: FAILED\n{error}\n")

    threads = [threading.Thread(target=worker, args=(s.rstrip("/"),), daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return jobs


def load_api_prompt(path: Path, server: str, retries: int) -> dict:
    workflow = json.loads(path.read_text())
    if "nodes" in workflow and "links" in workflow:
        return ui_to_api(workflow, http_json(f"{server}/object_info", retries=retries))
    return workflow


def parse_value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_lora(text: str) -> tuple[str, float]:
    name, _, strength = text.rpartition(":") if ":" in text else (text, "", "1.0")
    try:
        return name, float(strength)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lora {text!r}: write NAME or NAME:STRENGTH, e.g. style.safetensors:0.8") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflows", nargs="+", type=Path, help="workflow JSON files (API or UI format)")
    parser.add_argument("--server", action="append", default=[], help="a ComfyUI URL; repeat to spread jobs over several")
    parser.add_argument("--out", type=Path, default=Path("out"), help="where the images go")
    parser.add_argument("--checkpoint", help="checkpoint file name for CheckpointLoaderSimple")
    parser.add_argument("--lora", action="append", type=parse_lora, help="NAME[:STRENGTH] for Multi-LoRA Loader; repeat")
    parser.add_argument(
        "--style-lora",
        action="append",
        type=parse_lora,
        help="NAME[:STRENGTH] for the loader whose LoRAs are merged before the composition sampler (style merged "
        "workflows); repeat",
    )
    parser.add_argument("--prompt", help="the positive prompt (the node titled 'Positive prompt')")
    parser.add_argument("--negative", help="the negative prompt (the node titled 'Negative prompt')")
    parser.add_argument("--seed", action="append", type=int, help="a seed; repeat for one job per seed")
    parser.add_argument("--param", action="append", default=[], help="INPUT=VALUE set on every node with that input")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a job may take")
    parser.add_argument("--retries", type=int, default=3, help="retries of a failed connection")
    options = parser.parse_args(argv)
    servers = options.server or ["http://127.0.0.1:8188"]
    params = {}
    for item in options.param:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--param {item!r}: write INPUT=VALUE, e.g. temperature=0.1")
        params[key] = parse_value(value)
    jobs = []
    for path in options.workflows:
        base = load_api_prompt(path, servers[0].rstrip("/"), options.retries)
        for seed in options.seed or [None]:
            overrides = Overrides(options.checkpoint, options.lora, options.prompt, options.negative, seed, params)
            overrides.style_loras = options.style_lora
            name = path.name.removesuffix(".json") + ("" if seed is None else f"_seed{seed}")
            jobs.append(Job(name, apply_overrides(base, overrides)))
    finished = run_jobs(jobs, servers, options.out, options.timeout, options.retries)
    failed = [job for job in finished if job.error]
    for job in finished:
        for output in job.outputs:
            print(output)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
