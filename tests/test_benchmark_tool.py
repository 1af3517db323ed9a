"""The benchmark command runs and reports counts that match the math (its timings are not tested)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent


def test_benchmark_command_writes_its_reports(tmp_path):
    cmd = [sys.executable, str(PACK_DIR / "tools" / "benchmark.py"), "--models", "small", "--adapters", "2", "--pools", "",
           "--repeats", "1", "--methods", "loratorio,composite,hooks", "--out", str(tmp_path)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ), cwd=PACK_DIR)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    rows = {r["method"]: r for r in report["results"]}
    assert rows["loratorio"]["rows_per_step"] == 2 + 2 * 2 and rows["loratorio"]["forwards_per_step"] == 1
    assert rows["composite"]["rows_per_forward"] == 4 and rows["composite"]["forwards_per_step"] == 1
    assert rows["hooks"]["forwards_per_step"] == 2, "ComfyUI's hooks path runs one forward per hook group"
    assert rows["floor-6"]["rows_per_forward"] == 6
    assert (tmp_path / "results.png").stat().st_size > 10_000
    assert result.stdout.rstrip().endswith((tmp_path / "results.md").read_text().rstrip().splitlines()[-1])


def test_interleaved_whole_runs_count_the_rows_each_method_needs(tmp_path):
    cmd = [sys.executable, str(PACK_DIR / "tools" / "benchmark.py"), "--models", "small", "--adapters", "2",
           "--interleaved", "1:0", "--whole-run-steps", "2", "--repeats", "1", "--out", str(tmp_path)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ), cwd=PACK_DIR)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = {line.split(" | ")[2]: line.split(" | ") for line in (tmp_path / "interleaved.md").read_text().splitlines()[4:]}
    # KSampler: 2 rows a step. Merge: the same. LoRAtorio: 2 + 2N. Single pass, 1 full step: 2 + 2N, then 2.
    assert {label: float(cells[3]) for label, cells in table.items()} == {
        "merge": 1.0,
        "loratorio": 3.0,
        "single pass, 1 full step, no refresh": 2.0,
    }
    assert all(float(cells[4]) > 0 for cells in table.values())


def test_dispatch_counts_compare_each_method_with_ksampler(tmp_path):
    cmd = [sys.executable, str(PACK_DIR / "tools" / "benchmark.py"), "--dispatch", "--models", "small", "--adapters", "2,4",
           "--out", str(tmp_path)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ), cwd=PACK_DIR)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line.split(" | ") for line in (tmp_path / "dispatch.md").read_text().splitlines()[2:]]
    calls = {(cells[1], cells[2]): float(cells[3]) for cells in rows}
    ksampler = calls[("-", "ksampler")]
    for n in ("2", "4"):
        assert calls[(n, "merge")] == ksampler, "merged weights: KSampler's own forward, call for call"
        assert ksampler < calls[(n, "switch")] < calls[(n, "composite")] < calls[(n, "loratorio")]
        assert ksampler < calls[(n, "single pass (a routed step)")]
    # a layer's calls do not grow with N: one product per adapter block, one joined product per routed row
    for method in ("switch", "single pass (a routed step)"):
        assert calls[("2", method)] == calls[("4", method)], method
