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
