"""The runtime's own host-independent tests, run by pytest inside the arm64 root on each board's CPU.

The tests are copied from the checkout (engine, CPU plan, logbook incl. kill -9, commands, preprocess,
LiteRT, notify, health, topics) and import ``runtime`` from the device venv that install_device.sh
built from this checkout's wheel, not from the source tree.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest

from tests.arm64.harness import BOARD_CPUS, CPUS, DEVICE_VENV, OPTIONAL_TESTS, TEST_VENV, TESTS_DIR, Arm64Root, Harness

# MIDR part numbers qemu reports in /proc/cpuinfo for each model
CPU_PARTS = {"cortex-a72": "0xd08", "cortex-a76": "0xd0b", "cortex-a57": "0xd07"}
BOARD_OF = {cpu: board for board, cpu in BOARD_CPUS.items()}


@pytest.mark.parametrize("cpu", CPUS)
def test_the_emulated_cpu_is_the_board_s(arm64_root: Arm64Root, cpu: str) -> None:
    proc = arm64_root.run([f"{DEVICE_VENV}/bin/python", f"{TESTS_DIR}/probe.py", "cpu"], cpu=cpu, timeout=120)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen == {"machine": "aarch64", "cpu_parts": [CPU_PARTS[cpu]]}


@pytest.mark.parametrize("cpu", CPUS)
def test_runtime_tests_pass_on_the_emulated_cpu(
    arm64_root: Arm64Root, arm64_harness: Harness, arm64_report: dict[str, list[str]], cpu: str
) -> None:
    junit = f"{TESTS_DIR}/junit-{cpu}.xml"
    argv = [f"{TEST_VENV}/bin/python", "-m", "pytest", "-W", "error", "-q", "-p", "no:cacheprovider"]
    argv += ["-o", "addopts=--strict-markers", f"--junitxml={junit}", "tests"]
    with arm64_harness.stage(f"in-root runtime tests on {cpu}", build=False):
        proc = arm64_root.run(argv, cpu=cpu, cwd=f"{TESTS_DIR}/repo", timeout=1800)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"in-root pytest on {cpu} exited {proc.returncode}:\n{tail}"
    suite = ET.parse(arm64_root.host(junit)).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    assert counts["tests"] > 200 and counts["failures"] == counts["errors"] == 0, counts
    skipped = [f"{c.get('name')}: {s.get('message')}" for c in suite.iter("testcase") for s in c.iter("skipped")]
    assert not skipped, f"in-root tests skipped on {cpu} (install what they need in the test venv): {skipped}"
    modules = {".".join(c.get("classname", "").split(".")[:3]) for c in suite.iter("testcase")}
    took = re.search(r"in ([\d.]+)s", proc.stdout)
    missing = [t for t in OPTIONAL_TESTS if not arm64_root.host(f"{TESTS_DIR}/repo/{t}").is_file()]
    lines = arm64_report.setdefault("runtime tests inside the root (device venv, pytest -W error)", [])
    lines.append(
        f"{cpu} ({BOARD_OF[cpu]}): {counts['tests'] - counts['skipped']} passed, {counts['skipped']} skipped "
        f"in {took.group(1) if took else '?'} s emulated; {len(modules)} test modules"
    )
    if missing and cpu == CPUS[0]:
        lines.append(f"not yet in the repo, so not run: {', '.join(missing)} (model store / rollout state machine)")
