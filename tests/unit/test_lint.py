"""House style is checked, not hoped for: ruff and mypy --strict over both packages."""

from __future__ import annotations

import shutil
import subprocess
import sys

from tests.conftest import REPO


def _tool(name: str) -> list[str]:
    exe = shutil.which(name, path=str(REPO / ".venv" / "bin")) or shutil.which(name)
    return [exe] if exe else [sys.executable, "-m", name]


def test_ruff_is_clean() -> None:
    proc = subprocess.run(
        [*_tool("ruff"), "check", "runtime", "toolchain", "tests", "benchmarks"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict_is_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
