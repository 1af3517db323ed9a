"""The jobs of ``tools/testbed.py``: the server checks, one API prompt per (set, method, seed) from the
pack's nodes, the manifest of finished images, and the runner that spreads the jobs over the servers.

A worker per server takes the next job and runs it through ``comfy_client.run_job``. When a job fails
because ComfyUI rejected it or a node raised, the job is reported as failed. Any other failure (the
websocket closed, the server refused the connection, no result in time) asks the server whether it is
still there: if not, the job goes back to the front of the queue for the other servers and the worker
stops; if it is, the job is tried again up to ``--attempts`` times.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import re
import sys
import threading
import time
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import testbed_sets
from comfy_client import ClientError, Job, Overrides, apply_overrides, http_json, run_job

METHODS = ("lora-merge-baseline", "lora-switch", "lora-composite", "loratorio", "loratorio-dynamic-pool")
ALIASES = {
    "merge": "lora-merge-baseline",
    "switch": "lora-switch",
    "composite": "lora-composite",
    "dynamic-pool": "loratorio-dynamic-pool",
}
SAMPLER_NODES = {
    "lora-merge-baseline": "KSampler",
    "lora-switch": "LoRAtorioSwitchSampler",
    "lora-composite": "LoRAtorioCompositeSampler",
    "loratorio": "LoRAtorioSampler",
    "loratorio-dynamic-pool": "LoRAtorioSampler",
}
LOADER, SAMPLER, IMAGE = "5", "6", "8"  # node ids of toy_world.graph and make_workflows
LINKED = {"model", "positive", "negative", "lora_stack", "latent_image", "seed", "adapter_positive", "adapter_negative"}
JOB_ERRORS = ("ComfyUI rejected the workflow", "ComfyUI failed in node")


class InputError(ValueError):
    """A bad option, file or server: the message names the problem and the fix."""


def say(message: str) -> None:
    sys.stderr.write(f"\r[testbed] {message}\n")
    sys.stderr.flush()


@dataclass
class Config:
    sets: list[testbed_sets.CompositionSet]
    set_file: testbed_sets.SetFile
    servers: list[str]
    toy: bool
    checkpoint: str | None
    methods: list[str]
    settings: dict[str, dict[str, object]]
    seeds: list[int]
    steps: int
    width: int
    height: int
    sampling: dict[str, object]  # cfg, sampler_name, scheduler given on the command line or in the set file
    negative: str
    out: Path
    timeout: float
    attempts: int


# --- the servers ---------------------------------------------------------------------------------


def node_info(server: str, node: str) -> dict:
    try:
        return http_json(f"{server}/object_info/{node}", retries=1)[node]  # type: ignore[index]
    except ClientError as error:
        raise InputError(
            f"cannot reach ComfyUI at {server} ({error}); start it (e.g. `python3 tools/host.py serve`) or fix --server"
        ) from None
    except (urllib.error.HTTPError, KeyError, TypeError):
        hint = (
            "start it with the toy world (`tools/toy_world.py config`)"
            if node.startswith("Toy")
            else "install comfyui-loratorio there"
        )
        raise InputError(f"{server} has no node {node}; {hint}") from None


def choices(info: dict, name: str) -> list[str]:
    for section in ("required", "optional"):
        spec = info["input"].get(section, {}).get(name)
        if spec and isinstance(spec[0], list):
            return spec[0]
    return []


def check_servers(config: Config) -> None:
    """Every server answers, has the nodes, the checkpoint and the LoRAs; the settings are inputs of the nodes."""
    files = sorted({lora.file for s in config.sets for lora in s.loras})
    for server in config.servers:
        available = choices(node_info(server, "LoRAtorioMultiLoRALoader"), "lora_1")
        missing = [f for f in files if f not in available]
        if missing:
            raise InputError(
                f"{server} does not have the LoRA(s) {', '.join(missing)}; put them in its models/loras folder "
                f'(or fix "file" in {config.set_file.name}); it has: {", ".join(a for a in available if a != "None") or "none"}'
            )
        if config.toy:
            node_info(server, "ToyWorldLoader")
        elif config.checkpoint not in (checkpoints := choices(node_info(server, "CheckpointLoaderSimple"), "ckpt_name")):
            raise InputError(f"{server} has no checkpoint {config.checkpoint!r}; it has: {', '.join(checkpoints) or 'none'}")
    for method in config.methods:
        info = node_info(config.servers[0], SAMPLER_NODES[method])
        inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        allowed = sorted(set(inputs) - LINKED | {"strength"})
        for key, value in {**config.sampling, **config.settings[method]}.items():
            if key not in allowed:
                raise InputError(f"unknown setting {key!r} for {method}; its settings: {', '.join(allowed)}")
            options = choices(info, key)
            if options and value not in options:
                raise InputError(
                    f"{method}: {key} {value!r} is not offered by {config.servers[0]}; choose from {', '.join(options)}"
                )


# --- the jobs ------------------------------------------------------------------------------------


@dataclass
class Task:
    set: testbed_sets.CompositionSet
    method: str
    seed: int
    prompt: dict
    attempts: int = 0

    @property
    def key(self) -> str:
        return f"{self.set.id}|{self.method}|{self.seed}"

    @property
    def name(self) -> str:
        return f"{safe(self.set.id)}__{self.method}_seed{self.seed}"

    @property
    def image(self) -> str:
        return f"images/{safe(self.set.id)}/{self.method}_seed{self.seed}.png"

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.prompt, sort_keys=True).encode()).hexdigest()[:16]


def safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def strengths(config: Config, method: str, cset: testbed_sets.CompositionSet) -> list[float | None]:
    override = config.settings[method].get("strength")
    if override is not None:
        return [float(override)] * cset.n  # type: ignore[arg-type]
    return [lora.strength if lora.strength is not None else config.set_file.strength for lora in cset.loras]


def sampler_settings(config: Config, method: str, n: int) -> dict:
    settings = {k: v for k, v in config.settings[method].items() if k != "strength"}
    if method == "loratorio-dynamic-pool":
        settings.setdefault("top_k", max(1, n - 1))  # the pool keeps the N - 1 adapters departing most from the base
    return settings


def toy_graph(config: Config, method: str, cset: testbed_sets.CompositionSet, seed: int) -> dict:
    from toy_world import TRIGGERS, graph

    concepts = [lora.file.removeprefix("toy-").removesuffix(".safetensors") for lora in cset.loras]
    unknown = [lora.file for lora, c in zip(cset.loras, concepts, strict=True) if c not in TRIGGERS]
    if unknown:
        concepts_named = ", ".join(TRIGGERS)
        raise InputError(
            f'{", ".join(unknown)}: not a toy-world LoRA; with --toy a "file" is toy-<concept>.safetensors ({concepts_named})'
        )
    prompt = graph(method, concepts, seed)
    prompt.pop("9", None)  # LoRAtorio's weight maps: not judged
    prompt["2"]["inputs"]["text"] = cset.prompt
    prompt[SAMPLER]["inputs"].update(steps=config.steps, **config.sampling, **sampler_settings(config, method, cset.n))
    for slot, strength in enumerate(strengths(config, method, cset), start=1):
        if strength is not None:
            prompt[LOADER]["inputs"][f"strength_{slot}"] = strength
    return prompt


def model_graph(config: Config, method: str, cset: testbed_sets.CompositionSet, seed: int) -> dict:
    from make_workflows import LORATORIO, composition, merge_baseline

    loras = [(lora.file, 1.0 if s is None else s) for lora, s in zip(cset.loras, strengths(config, method, cset), strict=True)]
    if method == "lora-merge-baseline":
        prompt = merge_baseline(loras)
    else:
        defaults = {"lora-switch": {"tau": 5}, "lora-composite": {}}.get(method, LORATORIO)
        prompt = composition(SAMPLER_NODES[method], loras, dict(defaults), weight_maps=False)
    params = {"steps": config.steps, "width": config.width, "height": config.height, **config.sampling}
    prompt = apply_overrides(prompt, Overrides(config.checkpoint, None, cset.prompt, config.negative, seed, params))
    prompt[SAMPLER]["inputs"].update(sampler_settings(config, method, cset.n))
    prompt[IMAGE]["inputs"]["filename_prefix"] = f"testbed/{method}"
    return prompt


def build_tasks(config: Config) -> list[Task]:
    build = toy_graph if config.toy else model_graph
    return [
        Task(cset, method, seed, build(config, method, cset, seed))
        for cset in config.sets
        for method in config.methods
        for seed in config.seeds
    ]


# --- the manifest: finished images, so a re-run skips them ---------------------------------------


class Manifest:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.entries: dict[str, dict] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry  # a line cut off by a kill is skipped

    def finished(self, task: Task, out: Path) -> bool:
        entry = self.entries.get(task.key)
        return bool(entry) and entry["digest"] == task.digest and (out / entry["image"]).is_file()

    def add(self, entry: dict) -> None:
        with self.lock, self.path.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            self.entries[entry["key"]] = entry


# --- running: one worker per server; a server that goes away hands its job to the others ---------


def duration(seconds: float) -> str:
    seconds = round(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


def alive(server: str) -> bool:
    try:
        http_json(f"{server}/system_stats", timeout=5, retries=2)
        return True
    except (ClientError, urllib.error.HTTPError, OSError):
        return False


class Runner:
    def __init__(self, config: Config, tasks: list[Task], manifest: Manifest, skipped: int) -> None:
        self.config, self.manifest, self.skipped = config, manifest, skipped
        self.pending = collections.deque(tasks)
        self.total = len(tasks) + skipped
        self.in_flight, self.done_now = 0, 0
        self.failed: list[tuple[Task, str]] = []
        self.up = set(config.servers)
        self.cond = threading.Condition()
        self.started = time.monotonic()
        self.images = config.out / "images"

    def take(self) -> Task | None:
        with self.cond:
            while True:
                if self.pending:
                    self.in_flight += 1
                    return self.pending.popleft()
                if self.in_flight == 0:
                    return None
                self.cond.wait(0.5)

    def settle(self, task: Task, requeue: bool = False, error: str | None = None) -> None:
        with self.cond:
            self.in_flight -= 1
            if requeue:
                self.pending.appendleft(task)
            elif error:
                self.failed.append((task, error))
            self.cond.notify_all()

    def progress(self) -> None:
        done = self.skipped + self.done_now
        elapsed = time.monotonic() - self.started
        left = self.total - done - len(self.failed)
        eta = duration(elapsed / self.done_now * left) if self.done_now else "?"
        servers = f"{len(self.up)} server(s) up"
        say(f"{done}/{self.total} images ({self.skipped} from before), {servers}, {duration(elapsed)} elapsed, ETA {eta}")

    def finish(self, server: str, task: Task, job: Job, seconds: float) -> None:
        outputs = [p for p in job.outputs if p.stem.startswith(f"{job.name}_{IMAGE}_")]
        if not outputs:
            raise ClientError("the job saved no image")
        target = self.config.out / task.image
        target.parent.mkdir(parents=True, exist_ok=True)
        outputs[0].replace(target)
        for extra in job.outputs[1:]:
            extra.unlink(missing_ok=True)
        entry = {"key": task.key, "digest": task.digest, "image": task.image, "set": task.set.id, "n": task.set.n,
                 "method": task.method, "seed": task.seed, "server": server, "seconds": round(seconds, 2)}  # fmt: skip
        self.manifest.add(entry)
        with self.cond:
            self.done_now += 1
        self.progress()

    def work(self, server: str) -> None:
        while (task := self.take()) is not None:
            job, started = Job(task.name, task.prompt), time.monotonic()
            try:
                run_job(server, job, self.images, self.config.timeout, retries=1)
                self.finish(server, task, job, time.monotonic() - started)
                self.settle(task)
                continue
            except Exception as error:  # a worker must settle its job whatever went wrong
                message = str(error) or type(error).__name__
            if message.startswith(JOB_ERRORS):
                say(f"{task.key} failed on {server}:\n{message}")
                self.settle(task, error=message)
            elif not alive(server):
                say(f"{server} went away ({message}); {task.key} is queued again for the other server(s)")
                with self.cond:
                    self.up.discard(server)
                self.settle(task, requeue=True)
                return
            else:
                task.attempts += 1
                retry = task.attempts < self.config.attempts
                say(f"{task.key} on {server}: {message}; {'queued again' if retry else 'giving up'}")
                self.settle(task, requeue=retry, error=None if retry else message)

    def run(self) -> None:
        self.images.mkdir(parents=True, exist_ok=True)
        threads = [threading.Thread(target=self.work, args=(s,), daemon=True) for s in self.config.servers]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
