#!/usr/bin/env python3
"""Choose each composition method's settings on the tuning combinations, then freeze them.

    python3 tools/host.py run -- tools/quality/tune.py [--models DIR ...] [--images 8] [--methods ...]

Coordinate search from the harness's defaults: for each parameter of ``TUNING_GRID`` in order, every
value is scored with the others held at the best found so far, and the best value is kept. The score
is the mean shape-checked element recall over the tuning combinations (``harness.
TUNING_COMBINATIONS``; the test split is never seen), ties broken by the all-present rate.
The choice, with every candidate's score, is written to ``harness.SETTINGS_FILE``, which the
harness then uses as is. ``--methods`` re-tunes some methods and keeps the others' frozen choice.
Candidates already scored there under the same models, combinations, images, steps and sampling
seed are reused (sampling is deterministic), so widening a grid costs only the new values; after a
change to a method's code or to the models' files, pass ``--rescore``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quality.harness import (
    DEFAULT_SETTINGS,
    SETTINGS_FILE,
    ToyRun,
    add_generation_arguments,
    combinations,
    parse_methods,
    scored,
    seed_folders,
)

CFG_VALUES = (1.0, 1.5, 2.0, 3.0, 5.0)
# Values tried per parameter, in the order they are tuned (cfg first: the others' best depends on
# it). merge: the weight of each LoRA in the merge; switch: tau, steps per adapter; loratorio: patch
# side (latent pixels), SoftMin temperature T and the re-centring weight lambda.
TUNING_GRID: dict[str, dict[str, tuple]] = {
    "merge": {"cfg": CFG_VALUES, "strength": (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)},
    # tau * 4 <= 12 steps: every adapter of a 4-concept combination gets a turn. A larger tau stops
    # switching before the last adapters, and tau >= steps is the first LoRA alone (which scored
    # best, 0.375 on the tuning split: one concept per image, a setting that is no longer Switch).
    "switch": {"cfg": CFG_VALUES, "tau": (1, 2, 3)},
    "composite": {"cfg": CFG_VALUES},
    "loratorio": {
        "cfg": CFG_VALUES,
        "patch_size": (2, 4, 8),
        "temperature": (0.01, 0.05, 0.2),
        "recentre_lambda": (0.25, 0.5, 0.75, 1.0),
    },
}
SIZES = (2, 3, 4)


def tuning_context(runs: list[ToyRun], seed: int) -> dict:
    """What a candidate's score depends on besides its settings; scores are reused only when it matches."""
    return {
        "models": [toy.name for toy in runs],
        "combinations": ["+".join(c.name for c in combo) for combo in combinations(list(SIZES), "tune")],
        "images": runs[0].images,
        "steps": runs[0].steps,
        "sampling_seed": seed,
    }


def earlier_candidates(record: dict | None, context: dict) -> dict[str, dict]:
    """The candidates of an earlier tuning ``record`` (from ``SETTINGS_FILE``) made under ``context``."""
    if not record or any(record.get(key) != value for key, value in context.items()):
        return {}
    return {json.dumps(c["settings"], sort_keys=True): c for c in record.get("candidates", [])}


def tune_method(runs: list[ToyRun], method: str, seed: int, log, known: dict[str, dict] | None = None) -> tuple[dict, list[dict]]:
    """Coordinate search for one method: ``(best settings, every candidate it visited, with scores)``.

    ``known``: candidates already scored under the same context (see ``earlier_candidates``)."""
    combos = combinations(list(SIZES), "tune")
    candidates: dict[str, dict] = dict(known or {})
    visited: dict[str, dict] = {}  # in the order the search first reached them

    def evaluate(settings: dict) -> tuple[float, float]:
        key = json.dumps(settings, sort_keys=True)
        if key not in candidates:
            recall, present = tuning_scores(runs, method, combos, seed, settings)
            candidate = {"settings": settings, "recall": recall, "all_present": present}
            candidates[key] = candidate
            log(f"{method} {settings}: recall {candidate['recall']:.3f}, all present {candidate['all_present']:.3f}")
        visited[key] = candidates[key]
        return visited[key]["recall"], visited[key]["all_present"]

    best = dict(DEFAULT_SETTINGS[method])
    for parameter, values in TUNING_GRID[method].items():
        best = max(({**best, parameter: value} for value in values), key=evaluate)
    return best, list(visited.values())


def tuning_scores(runs: list[ToyRun], method: str, combos: list, seed: int, settings: dict) -> tuple[float, float]:
    """Mean shape-checked recall and all-present rate of ``settings`` over ``combos`` and every run."""
    recall, present = [], []
    for toy in runs:
        for combo in combos:
            scores, _ = scored(toy, method, combo, seed, settings)
            recall += scores.recall
            present += scores.all_present
    return sum(recall) / len(recall), sum(present) / len(present)


def score_settings(runs: list[ToyRun], method: str, tries: list[dict], seed: int, log) -> None:
    """Score explicit candidate settings of ``method`` on the tuning split (``--try``)."""
    combos = combinations(list(SIZES), "tune")
    for settings in tries:
        recall, present = tuning_scores(runs, method, combos, seed, settings)
        log(f"{method} {settings}: recall {recall:.3f}, all present {present:.3f}")


def main() -> int:
    from host_env import comfyui_on_path, load_pack

    comfyui_on_path("quality/tune.py")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_arguments(parser, images=8)
    parser.add_argument("--seed", type=int, default=2, help="the sampling seed (the harness's test runs use 1)")
    parser.add_argument("--rescore", action="store_true", help="score every candidate again instead of reusing earlier scores")
    parser.add_argument(
        "--try",
        dest="tries",
        action="append",
        type=json.loads,
        help="score these settings (JSON) of the one --methods method on the tuning split, print, write nothing",
    )
    options = parser.parse_args()
    methods = parse_methods(options.methods)
    seed_dirs = seed_folders(options.models)
    pack = load_pack()
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[tune] {message} ({time.monotonic() - started:.0f} s)", flush=True)

    frozen = json.loads(SETTINGS_FILE.read_text()) if SETTINGS_FILE.exists() else {"settings": {}, "tuning": {}}
    runs = [ToyRun(pack, folder, options.images, options.steps) for folder in seed_dirs]
    context = tuning_context(runs, options.seed)
    if options.tries:
        if len(methods) != 1:
            parser.error("--try scores settings of one method: give exactly one --methods")
        score_settings(runs, methods[0], options.tries, options.seed, log)
        return 0
    for method in methods:
        known = {} if options.rescore else earlier_candidates(frozen["tuning"].get(method), context)
        if known:
            log(f"{method}: reusing {len(known)} candidates scored earlier under the same context")
        best, candidates = tune_method(runs, method, options.seed, log, known)
        frozen["settings"][method] = best
        frozen["tuning"][method] = {**context, "candidates": candidates}
        SETTINGS_FILE.write_text(json.dumps(frozen, indent=1) + "\n")
        log(f"{method}: chose {best}; wrote {SETTINGS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
