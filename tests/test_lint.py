"""The pack stays ruff clean (rules in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent


def test_ruff_clean():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=PACK_DIR, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
