#!/usr/bin/env python3
"""One method before and after a change to the pack: paired differences, image by image.

    python3 tools/host.py run -- tools/quality/compare_runs.py --method loratorio-routed \\
        --before out/quality/old-seed-*/results.json --after out/quality/new-seed-*/results.json

Both sets of ``results.json`` (one per training seed, as ``harness.py --combine`` takes them) must
come from harness runs made alike (scenario, images, steps, sampling seed, settings), e.g. one run
in a worktree of the old commit and one of the new: the same sampling seed gives each image the same
starting noise, so the per-image differences isolate the change. Prints, per N, the method's recall
(or, with regions, its placement) after minus before, with a 95% bootstrap interval.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quality.harness import combined_runs, differences_markdown, paired_differences


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True, help="the method whose runs to compare")
    parser.add_argument("--before", type=Path, nargs="+", required=True, help="results.json of the runs before the change")
    parser.add_argument("--after", type=Path, nargs="+", required=True, help="results.json of the runs after it")
    options = parser.parse_args()
    before, before_sampling, before_settings, _ = combined_runs(options.before)
    after, after_sampling, after_settings, _ = combined_runs(options.after)
    if before_sampling != after_sampling or before_settings.get(options.method) != after_settings.get(options.method):
        sys.exit("the two sets differ in sampling or in the method's settings; compare only runs made alike")
    baseline = f"{options.method} before"
    mine, theirs = ([r for r in runs if r.method == options.method] for runs in (after, before))
    if not mine or not theirs:
        sys.exit(f"both sets need runs of {options.method}")
    for run in theirs:
        run.method = baseline
    runs = mine + theirs
    metric = "placed" if any(r.placed for r in runs) else "recall"
    print(differences_markdown(paired_differences(runs, options.method, metric, others=[baseline])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
