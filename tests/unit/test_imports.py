"""The device package must never pull in host-only frameworks."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import runtime
from tests.conftest import REPO

FORBIDDEN = (
    "torch",
    "onnx",
    "toolchain",
    "onnxruntime.quantization",
    "pydantic",
    "requests",
    "onnxscript",
    "onnxslim",
)


def test_runtime_modules_never_import_host_frameworks() -> None:
    modules = sorted(
        m.name for m in pkgutil.walk_packages(runtime.__path__, "runtime.") if not m.name.endswith("__main__")
    )
    assert "runtime.engine" in modules and "runtime.backends.ort" in modules
    code = (
        "import importlib, sys\n"
        f"mods = {modules!r}\n"
        "for m in mods: importlib.import_module(m)\n"
        # load a real session too: the ORT engine must not drag anything in when used
        "import runtime.backends.ort\n"
        f"forbidden = {FORBIDDEN!r}\n"
        "bad = sorted(n for n in sys.modules if any(n == f or n.startswith(f + '.') for f in forbidden))\n"
        "print(','.join(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "", f"runtime imported: {proc.stdout.strip()}"
