#!/bin/sh
# Install the edgefleet device runtime into a virtual environment.
# The one install path for devices: Dockerfile.arm64 runs it, and the arm64 (qemu) tests run it
# inside their emulated root. Usage: install_device.sh WHEEL_OR_SOURCE [VENV] [EXTRAS]
#   EXTRAS: comma-separated extras (default "device"; "device,tflite" adds the LiteRT engine).
# Running it again on an existing venv keeps the installed dependencies and swaps in this wheel,
# even when its version number did not change (a new build of the same version).
set -eu
src="${1:?usage: install_device.sh WHEEL_OR_SOURCE [VENV] [EXTRAS]}"
venv="${2:-/opt/edge-runtime}"
extras="${3:-device}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --no-cache-dir --upgrade pip >/dev/null
fi
# the device extra (and optionally tflite) only: no torch, no onnx
"$venv/bin/pip" install --no-cache-dir "${src}[${extras}]"
"$venv/bin/pip" install --no-cache-dir --no-deps --force-reinstall "$src"
"$venv/bin/python" - <<'PY'
import sys, runtime, runtime.backends.ort  # noqa: F401
bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "toolchain")]
assert not bad, f"device install imports host frameworks: {bad}"
print("edgefleet device runtime", runtime.__version__, "installed")
PY
