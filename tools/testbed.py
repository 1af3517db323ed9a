#!/usr/bin/env python3
"""The ComposLoRA testbed, headless: composition sets in, every method's images and judged scores out.

    # the toy world, end to end, through two ComfyUI servers it starts here and stops at the end
    python3 tools/host.py run -- tools/testbed.py run --toy --sets tools/testbed_toy_sets.json \\
        --local-servers 2 --seeds 1,2 --out out/testbed-toy
    # ... or on servers you started (`tools/toy_world.py config` writes their config)
    python3 tools/host.py run -- tools/testbed.py run --toy --sets tools/testbed_toy_sets.json \\
        --server http://127.0.0.1:8188 --server http://127.0.0.1:8189 --seeds 1,2 --out out/testbed-toy

    # ComposLoRA on your GPUs (docs/testbed.md): import the official layout, then run and judge
    python3 tools/testbed.py import anime_lora_info.json --out composlora-anime.json
    python3 tools/testbed.py run --sets composlora-anime.json --checkpoint counterfeit-v2.5.safetensors \\
        --server http://gpu1:8188 --server http://gpu2:8188 --methods loratorio,composite,switch,merge \\
        --n 2-5 --judge vlm --judge-url https://api.openai.com/v1 --judge-model gpt-4o --out out/composlora

One API prompt per (set, method, seed) is built from the pack's nodes (Multi-LoRA Loader, then the
LoRAtorio / LoRA Composite / LoRA Switch sampler, or LoRA Merge and a KSampler) and queued through
``tools/comfy_client.py``, one worker per ``--server``. A server that goes away has its job queued
again on the others. ``manifest.jsonl`` in ``--out`` records each finished image with a hash of its
prompt, so running the same command again skips them. Then: a comparison sheet per set
(``sheets/``), the pairwise judge (``--judge vlm|detector|none``), and ``results.json``,
``results.csv``, ``judgements.csv``, ``table.csv`` and ``table.md`` (win / tie / loss per N and
method pair with 95% Wilson intervals, as in the paper's tables).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS_DIR))
import testbed_judges as judges  # noqa: E402
import testbed_report as report  # noqa: E402
import testbed_sets  # noqa: E402
from testbed_jobs import ALIASES, METHODS, Config, InputError, Manifest, Runner, build_tasks, check_servers, say  # noqa: E402

EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130
TOY_SIZE = 32  # the toy world's only image size


# --- options -------------------------------------------------------------------------------------


def parse_methods(text: str) -> list[str]:
    methods = [ALIASES.get(m.strip(), m.strip()) for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        named = ", ".join(unknown) or repr(text)
        raise InputError(f"--methods: unknown method {named}; choose from {', '.join(METHODS)} (or merge, switch, composite)")
    return list(dict.fromkeys(methods))


def parse_n_range(text: str) -> range:
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    low, high = (int(match.group(1)), int(match.group(2) or match.group(1))) if match else (0, -1)
    if not match or not 2 <= low <= high <= testbed_sets.MAX_N:
        limit = testbed_sets.MAX_N
        raise InputError(
            f"--n {text!r}: give N or LOW-HIGH with 2 <= LOW <= HIGH <= {limit}, e.g. --n 2-5 (a set composes 2 or more)"
        )
    return range(low, high + 1)


def parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v < 0 for v in values):
        raise InputError(f"{option} {text!r}: give non-negative integers separated by commas, e.g. {option} 1,2,3")
    return values


def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", text.strip())
    if not match:
        raise InputError(f"--size {text!r}: give WIDTHxHEIGHT or one number, e.g. --size 768x1024 or --size 512")
    width = int(match.group(1))
    height = int(match.group(2) or width)
    if width % 8 or height % 8 or not (64 <= width <= 8192 and 64 <= height <= 8192):
        raise InputError(f"--size {text!r}: width and height are multiples of 8 between 64 and 8192")
    return width, height


def parse_settings(items: list[str], methods: list[str]) -> dict[str, dict[str, object]]:
    settings: dict[str, dict[str, object]] = {m: {} for m in methods}
    for item in items:
        target, sep, value = item.partition("=")
        method, dot, key = target.rpartition(".")
        method = ALIASES.get(method, method)
        if not sep or not dot or method not in settings:
            running = ", ".join(methods)
            raise InputError(
                f"--setting {item!r}: write METHOD.INPUT=VALUE for a method being run ({running}), e.g. loratorio.temperature=0.1"
            )
        try:
            settings[method][key] = json.loads(value)
        except json.JSONDecodeError:
            settings[method][key] = value
    return settings


def parse_pairs(text: str, methods: list[str], baseline: str | None) -> list[tuple[str, str]]:
    if text == "all":
        return [(a, b) for i, b in enumerate(methods) for a in methods[i + 1 :]]
    if text == "baseline":
        base = ALIASES.get(baseline or "", baseline) or (
            "lora-merge-baseline" if "lora-merge-baseline" in methods else methods[0]
        )
        if base not in methods:
            raise InputError(f"--baseline {baseline!r} is not among --methods ({', '.join(methods)})")
        return [(m, base) for m in methods if m != base]
    pairs = []
    for item in text.split(","):
        a, sep, b = item.partition(":")
        a, b = ALIASES.get(a, a), ALIASES.get(b, b)
        if not sep or a not in methods or b not in methods or a == b:
            raise InputError(
                f"--pairs {item!r}: write A:B with two different methods being run ({', '.join(methods)}), or 'baseline' or 'all'"
            )
        pairs.append((a, b))
    return pairs


def select_sets(set_file: testbed_sets.SetFile, sizes: range | None, per_n: int | None) -> list[testbed_sets.CompositionSet]:
    available = sorted({s.n for s in set_file.sets})
    chosen = [s for s in set_file.sets if sizes is None or s.n in sizes]
    if not chosen:
        raise InputError(
            f"--n {sizes.start}-{sizes.stop - 1}: the set file has sets of N = {', '.join(map(str, available))} only"
        )
    if per_n:
        by_n: dict[int, list[testbed_sets.CompositionSet]] = {}
        for cset in chosen:
            by_n.setdefault(cset.n, []).append(cset)
        kept = {cset.id for sets in by_n.values() for cset in sets[:per_n]}
        chosen = [cset for cset in chosen if cset.id in kept]
    return chosen


def make_config(options: argparse.Namespace) -> Config:
    try:
        set_file = testbed_sets.load(options.sets)
    except testbed_sets.SetFileError as error:
        raise InputError(str(error)) from None
    if options.toy == bool(options.checkpoint):
        raise InputError("give --checkpoint NAME (a checkpoint on your ComfyUI) or --toy (the toy world), one of them")
    if options.toy and options.size:
        raise InputError("--size does not apply to the toy world (its images are 32x32); leave it out with --toy")
    methods = parse_methods(options.methods)
    defaults = set_file.defaults
    width, height = parse_size(options.size) if options.size else (defaults.get("width", 512), defaults.get("height", 512))
    if options.toy:
        width, height = TOY_SIZE, TOY_SIZE
    given = {"cfg": options.cfg, "sampler_name": options.sampler, "scheduler": options.scheduler}
    sampling = {key: value if value is not None else defaults.get(key) for key, value in given.items()}
    sampling = {key: value for key, value in sampling.items() if value is not None}  # else each method's own
    steps = options.steps or defaults.get("steps") or (12 if options.toy else 30)
    if steps < 1:
        raise InputError(f"--steps {steps}: give at least 1")
    return Config(
        sets=select_sets(set_file, parse_n_range(options.n) if options.n else None, options.sets_per_n),
        set_file=set_file, servers=[s.rstrip("/") for s in options.server or ["http://127.0.0.1:8188"]],
        toy=options.toy, checkpoint=options.checkpoint, methods=methods, settings=parse_settings(options.setting, methods),
        seeds=parse_ints(options.seeds, "--seeds") if options.seeds else list(defaults.get("seeds", [1])),
        steps=int(steps), width=int(width), height=int(height), sampling=sampling,
        negative=options.negative if options.negative is not None else set_file.negative,
        out=options.out.resolve(), timeout=options.timeout, attempts=options.attempts,
    )  # fmt: skip


# --- commands ------------------------------------------------------------------------------------


@contextlib.contextmanager
def local_servers(count: int, out: Path) -> Iterator[list[str]]:
    """``count`` ComfyUI servers of the pinned host with the toy world, stopped on exit (also on Ctrl-C)."""
    from comfy_server import comfyui_server
    from host_env import comfyui_on_path
    from toy_world import write_server_config

    comfyui = comfyui_on_path("testbed.py")
    with contextlib.ExitStack() as stack:
        urls = []
        for index in range(1, count + 1):
            work = out / f"comfyui-{index}"
            work.mkdir(parents=True, exist_ok=True)
            arguments = ("--extra-model-paths-config", str(write_server_config(work)))
            server = stack.enter_context(comfyui_server(comfyui, work, extra_args=arguments, env={"OMP_NUM_THREADS": "1"}))
            say(f"started ComfyUI {index} of {count} at {server.url} (log: {work / 'server.log'})")
            urls.append(server.url)
        try:
            yield urls
        finally:
            say(f"stopping the {count} local ComfyUI server(s)")
    say("local ComfyUI server(s) stopped")


def run_command(options: argparse.Namespace) -> int:
    config = make_config(options)
    pairs = parse_pairs(options.pairs, config.methods, options.baseline)
    if options.judge == "vlm" and not (options.judge_url and options.judge_model):
        raise InputError(
            "--judge vlm needs --judge-url (an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1) and --judge-model"
        )
    if options.judge == "detector" and not config.toy:
        raise InputError("--judge detector reads toy-world images only (with --toy); use --judge vlm for your own models")
    if not options.local_servers:
        return run_on_servers(config, options, pairs)
    if not config.toy or options.server:
        raise InputError("--local-servers starts toy-world servers on this machine: use it with --toy and without --server")
    with local_servers(options.local_servers, config.out) as urls:
        config.servers = urls
        return run_on_servers(config, options, pairs)


def run_on_servers(config: Config, options: argparse.Namespace, pairs: list[tuple[str, str]]) -> int:
    check_servers(config)
    tasks = build_tasks(config)
    config.out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(config.out / "manifest.jsonl")
    todo = [t for t in tasks if not manifest.finished(t, config.out)]
    done = len(tasks) - len(todo)
    shape = f"{len(config.sets)} set(s) x {len(config.methods)} method(s) x {len(config.seeds)} seed(s) = {len(tasks)} images"
    say(f"{shape}; {done} already done, {len(todo)} to run on {len(config.servers)} server(s)")
    runner = Runner(config, todo, manifest, done)
    try:
        runner.run()
    except KeyboardInterrupt:
        finished = runner.skipped + runner.done_now
        say(f"interrupted: {finished} of {len(tasks)} images are done and kept; run the same command to resume")
        return EXIT_INTERRUPTED
    if runner.pending:
        say(f"every server went away with {len(runner.pending)} image(s) left; start one and run the same command to resume")
        return 1
    records = {t.key: manifest.entries[t.key] for t in tasks if manifest.finished(t, config.out)}
    try:
        table = report.judge_and_report(config, options, records, runner.failed, pairs)
    except judges.JudgeError as error:
        say(f"the judge stopped: {error}\nimages and verdicts so far are kept; run the same command to go on")
        return 1
    print(f"{len(records)} of {len(tasks)} images in {config.out / 'images'}; sheets in {config.out / 'sheets'}")
    if table:
        print(judges.markdown(table))
    print(f"results: {config.out / 'results.json'} (and results.csv, judgements.csv, table.csv, table.md)")
    for task, error in runner.failed:
        say(f"FAILED {task.key}: {error.splitlines()[0]}")
    return 1 if runner.failed else 0


def import_command(options: argparse.Namespace) -> int:
    if not options.info.is_file():
        raise InputError(f"{options.info}: no such file; give the official anime_lora_info.json or reality_lora_info.json")
    try:
        document = json.loads(options.info.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{options.info}: not valid JSON ({error}); give the official *_lora_info.json") from None
    if not testbed_sets.is_official(document):
        raise InputError(f'{options.info}: not the official layout (categories of {{"id", "name", "trigger"}} entries)')
    style = options.style or testbed_sets.style_of(str(options.info))
    sizes = parse_n_range(options.n)
    try:
        converted = testbed_sets.import_official(document, style, options.lora_prefix, sizes)
    except testbed_sets.SetFileError as error:
        raise InputError(f"{options.info}: {error}") from None
    options.out.write_text(json.dumps(converted, indent=1) + "\n")
    counts = ", ".join(f"N={n}: {c}" for n, c in sorted(collections.Counter(len(s["loras"]) for s in converted["sets"]).items()))
    example = next(iter(converted["loras"].values()))["file"]
    print(
        f"wrote {options.out}: {len(converted['loras'])} LoRAs, {len(converted['sets'])} sets ({counts}); LoRA files as {example}"
    )
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="generate every (set, method, seed) image, judge the pairs, write sheets and results")
    run.add_argument(
        "--sets", type=Path, required=True, help="composition-set file (docs/testbed.md) or an official *_lora_info.json"
    )
    run.add_argument("--server", action="append", help="a ComfyUI URL; repeat to spread the jobs (default http://127.0.0.1:8188)")
    run.add_argument(
        "--local-servers", type=int, default=0, help="with --toy: start this many toy ComfyUI servers here, stop them at the end"
    )
    run.add_argument(
        "--toy", action="store_true", help="the toy world's models and nodes (tools/toy_world.py) instead of --checkpoint"
    )
    run.add_argument("--checkpoint", help="the checkpoint's name in your ComfyUI's checkpoints list")
    run.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    run.add_argument(
        "--setting",
        action="append",
        default=[],
        help="METHOD.INPUT=VALUE, e.g. loratorio.temperature=0.1, switch.tau=5, merge.strength=0.8",
    )
    run.add_argument("--n", help="N or LOW-HIGH: the set sizes to run (default: every size in the file)")
    run.add_argument("--sets-per-n", type=int, help="run only the first K sets of each N (a cheaper sample)")
    run.add_argument("--seeds", help="comma-separated seeds (default: the set file's, else 1)")
    run.add_argument("--steps", type=int, help="sampling steps (default: the set file's, else 12 toy / 30)")
    run.add_argument("--size", help="WIDTHxHEIGHT (default: the set file's, else 512)")
    run.add_argument("--cfg", type=float, help="guidance scale for every method (default: the set file's, else each method's)")
    run.add_argument("--sampler", help="ComfyUI sampler_name for every method")
    run.add_argument("--scheduler", help="ComfyUI scheduler for every method")
    run.add_argument("--negative", help="the negative prompt (default: the set file's)")
    run.add_argument("--out", type=Path, default=Path("out/testbed"), help="output folder; running again resumes there")
    run.add_argument("--timeout", type=float, default=900.0, help="seconds one image may take")
    run.add_argument("--attempts", type=int, default=3, help="tries of an image whose server stays up but does not deliver")
    run.add_argument("--judge", choices=("none", "detector", "vlm"), help="default: detector with --toy, else none")
    run.add_argument("--pairs", default="baseline", help="'baseline' (each method vs --baseline), 'all', or A:B,C:D")
    run.add_argument("--baseline", help="the method the others are compared with (default lora-merge-baseline, else the first)")
    run.add_argument("--judge-url", help="an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1")
    run.add_argument("--judge-model", help="a vision chat model there, e.g. gpt-4o")
    run.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="the environment variable holding the key")
    run.add_argument("--judge-rpm", type=float, default=20.0, help="at most this many judge requests a minute")
    run.add_argument("--judge-retries", type=int, default=5, help="retries of a request refused with 429/5xx or cut off")
    run.add_argument("--judge-parse-retries", type=int, default=3, help="new requests when an answer has no parsable scores")
    run.add_argument("--judge-temperature", type=float, default=1.0, help="the paper's: 1.0")
    run.add_argument("--judge-max-tokens", type=int, default=2048)
    imp = sub.add_parser("import", help="convert the official <style>_lora_info.json into a set file")
    imp.add_argument(
        "info", type=Path, help="anime_lora_info.json or reality_lora_info.json from maszhongming/Multi-LoRA-Composition"
    )
    imp.add_argument("--out", type=Path, required=True, help="the set file to write")
    imp.add_argument("--style", choices=sorted(testbed_sets.OFFICIAL_STYLES), help="default: from the file name")
    imp.add_argument("--lora-prefix", help="how the LoRA files are named in your ComfyUI (default ComposLoRA/<style>/)")
    imp.add_argument("--n", default="2-5", help="set sizes to form (default 2-5: all 240 sets of a style)")
    return top


def main(argv: list[str] | None = None) -> int:
    options = parser().parse_args(argv)
    if options.command == "run" and options.judge is None:
        options.judge = "detector" if options.toy else "none"
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill stops like Ctrl-C: the manifest is kept
    try:
        return run_command(options) if options.command == "run" else import_command(options)
    except InputError as error:
        print(f"testbed: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        say("interrupted; run the same command to resume")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
