"""One install path: Dockerfile.arm64 and the qemu root run the very same tests/arm64/install_device.sh."""

from __future__ import annotations

import re

from tests.arm64.harness import DEVICE_VENV, INSTALL_SCRIPT, REPO, Arm64Root


def test_dockerfile_runs_the_harness_install_script() -> None:
    text = (REPO / "Dockerfile.arm64").read_text()
    rel = INSTALL_SCRIPT.relative_to(REPO).as_posix()
    copied = re.search(rf"^COPY {re.escape(rel)} (\S+)$", text, re.M)
    assert copied, f"Dockerfile.arm64 does not COPY {rel}"
    assert re.search(rf"^RUN sh {re.escape(copied.group(1))} .* {DEVICE_VENV} ", text, re.M)
    assert "FROM --platform=linux/arm64 debian:bookworm" in text  # the suite the harness debootstraps


def test_the_root_venv_came_from_that_script(arm64_root: Arm64Root) -> None:
    """The script's own closing check ran in the root: its venv has the runtime's console script."""
    assert arm64_root.host(f"{DEVICE_VENV}/bin/edge-runtime").is_file()
    assert arm64_root.host("/tmp/install_device.sh").read_bytes() == INSTALL_SCRIPT.read_bytes()
