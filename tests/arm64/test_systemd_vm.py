"""systemd for real: edge-runtime.service in a booted arm64 Debian (systemd 252) under qemu-system-aarch64.

The VM has a Raspberry Pi 4's shape (virt, cortex-a72, 4 cores, 2 GiB) and no network. It boots once
per session; ``vm_checks.py`` runs every check inside and reports through a second virtio disk, and
each test below asserts one of them. Times in the report are emulated (TCG), never a board's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.arm64.gate import unavailable
from tests.arm64.harness import Arm64Root, Harness, HarnessError
from tests.arm64.vm import run_vm_checks


@pytest.fixture(scope="module")
def vm_report(
    arm64_root: Arm64Root, arm64_harness: Harness, arm64_inputs: Path, arm64_report: dict[str, list[str]]
) -> dict[str, Any]:
    try:
        report = run_vm_checks(arm64_harness, arm64_root, arm64_inputs)
    except HarnessError as exc:
        unavailable(str(exc))
    checks = report["checks"]
    lines = arm64_report.setdefault("systemd in the arm64 VM (virt, cortex-a72 ×4, 2 GiB; emulated)", [])
    lines.append(
        f"{report['systemd']}, kernel {report['uname']}; checks began {report['boot_to_checks_s']:.0f} s after power-on"
    )
    for name, result in checks.items():
        detail = {k: v for k, v in result.items() if k not in ("ok", "trace", "journal", "verify_output", "log")}
        lines.append(f"{name}: {'ok' if result.get('ok') else 'FAILED'} {json.dumps(detail)}")
    return report


def _check(report: dict[str, Any], name: str) -> dict[str, Any]:
    result: dict[str, Any] = report["checks"][name]
    assert result.get("ok"), f"{name}: {json.dumps(result, indent=1)}\nconsole: {report.get('console')}"
    return result


def test_unit_installs_and_verifies(vm_report: dict[str, Any]) -> None:
    result = _check(vm_report, "install")
    assert result["verify_rc"] == 0, result["verify_output"]


def test_unit_is_active_only_after_ready(vm_report: dict[str, Any]) -> None:
    result = _check(vm_report, "ready")
    assert result["states"][0] == "activating/start" and result["states"][-1] == "active/running"
    assert result["status_text"].startswith("digits 1.0.0")  # the STATUS= sent with READY=1


def test_hardened_service_writes_its_state_directory(vm_report: dict[str, Any]) -> None:
    result = _check(vm_report, "state_dir")
    assert result["root_mount_options_seen_by_service"].startswith("ro")
    assert result["inference_rows"] >= 6 and result["status_json"]


def test_killing_the_main_process_restarts_it(vm_report: dict[str, Any]) -> None:
    result = _check(vm_report, "kill_restart")
    assert result["new_pid"] != result["old_pid"]


def test_a_stalled_loop_is_restarted_by_the_watchdog(vm_report: dict[str, Any]) -> None:
    result = _check(vm_report, "watchdog")
    assert any("Watchdog timeout" in line for line in result["journal"])


def test_a_bad_config_exits_2_and_is_not_restarted(vm_report: dict[str, Any]) -> None:
    result = _check(vm_report, "bad_config")
    assert result["ExecMainStatus"] == "2" and result["ActiveState"] == "failed"
