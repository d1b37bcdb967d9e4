"""The shipped systemd files: `systemd-analyze verify` accepts the unit (and rejects a typo'd copy),
the required directives carry the right values, and the tmpfiles rules apply to a scratch root.

`verify` insists that ExecStart= names an existing executable, and the real one lives in /opt on the
device. So the unit is verified as a copy whose ExecStart= path (only the path; arguments and every
other line unchanged) points at a stub script in tmp_path. `verify` reports bad keys and values as
warnings with exit status 0, so any diagnostic that names the unit file counts as a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

SYSTEMD = REPO / "systemd"
UNIT = SYSTEMD / "edge-runtime.service"
EXEC = "/opt/edge-runtime/bin/edge-runtime"


def _tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing; .ci/bootstrap installs it (apt-get install -y systemd)")
        pytest.skip(f"{name} not installed (apt-get install -y systemd)")
    return exe


def _verify(text: str, tmp_path: Path, *, stub: bool = True) -> tuple[int, list[str]]:
    """Run `systemd-analyze verify` on ``text``; return (exit status, diagnostics naming the unit)."""
    exe = _tool("systemd-analyze")
    if stub:
        fake = tmp_path / "bin" / "edge-runtime"
        fake.parent.mkdir(exist_ok=True)
        fake.write_text("#!/bin/sh\nexit 0\n")
        fake.chmod(0o755)
        assert f"ExecStart={EXEC} " in text
        text = text.replace(f"ExecStart={EXEC} ", f"ExecStart={fake} ")
    unit = tmp_path / "edge-runtime.service"
    unit.write_text(text)
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""}
    proc = subprocess.run([exe, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=120, env=env)
    noise = proc.stdout + proc.stderr
    return proc.returncode, [line for line in noise.splitlines() if "edge-runtime.service" in line]


def _directives(text: str) -> dict[str, dict[str, list[str]]]:
    """Unit file → {section: {key: [values in order]}} (keys may repeat in systemd units)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    code, diagnostics = _verify(UNIT.read_text(), tmp_path)
    assert diagnostics == [] and code == 0, "\n".join(diagnostics)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("WatchdogSec=30", "WatchdogSecs=30"), "Unknown key"),
        (("ProtectSystem=strict", "ProtectSytem=strict"), "Unknown key"),
        (("Restart=on-failure", "Restart=on-failur"), "Failed to parse"),
        (("Type=notify", "Type=notfy"), "Failed to parse"),
    ],
)
def test_a_broken_copy_is_rejected(tmp_path: Path, edit: tuple[str, str], expected: str) -> None:
    original = UNIT.read_text()
    broken = re.sub(rf"^{re.escape(edit[0])}$", edit[1], original, count=1, flags=re.M)
    assert broken != original
    _code, diagnostics = _verify(broken, tmp_path)
    assert any(expected in line for line in diagnostics), diagnostics


def test_without_the_stub_verify_wants_the_real_executable(tmp_path: Path) -> None:
    if Path(EXEC).exists():
        pytest.skip(f"{EXEC} exists on this machine")
    code, diagnostics = _verify(UNIT.read_text(), tmp_path, stub=False)
    assert code != 0 and any("is not executable" in line for line in diagnostics), diagnostics


def test_required_directives_have_the_right_values() -> None:
    d = _directives(UNIT.read_text())
    svc = d["Service"]

    def one(key: str) -> str:
        assert len(svc.get(key, [])) == 1, f"{key}: {svc.get(key)}"
        return svc[key][0]

    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": f"{EXEC} serve --config /etc/edge-runtime/config.toml",
        "WatchdogSec": "30",
        "TimeoutStartSec": "120",
        "Restart": "on-failure",
        "RestartSec": "2",
        "RestartPreventExitStatus": "2",
        "KillSignal": "SIGTERM",
        "StateDirectory": "edge-runtime",
        "CacheDirectory": "edge-runtime",
        "ConfigurationDirectory": "edge-runtime",
        "User": "edge-runtime",
        "Group": "edge-runtime",
        "SupplementaryGroups": "video",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "DevicePolicy": "closed",
        "EnvironmentFile": "-/etc/edge-runtime/env",
    }
    wrong = {k: svc.get(k) for k, v in expected.items() if svc.get(k) != [v]}
    assert wrong == {}, wrong
    assert "char-video4linux rw" in svc["DeviceAllow"]
    assert "PYTHONUNBUFFERED=1" in svc["Environment"]
    assert 0 < int(one("TimeoutStopSec")) <= 90
    # choices the unit documents: a fixed user (not DynamicUser), no W^X, no unused LogsDirectory
    assert not {"DynamicUser", "MemoryDenyWriteExecute", "LogsDirectory", "ReadWritePaths"} & set(svc)
    unit = d["Unit"]
    assert int(unit["StartLimitBurst"][0]) >= 3 and unit["StartLimitIntervalSec"] == ["10min"]
    assert d["Install"]["WantedBy"] == ["multi-user.target"]


def test_tmpfiles_rules_apply_to_a_scratch_root(tmp_path: Path) -> None:
    exe = _tool("systemd-tmpfiles")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    # the service user resolves inside --root; mapping it to our own ids lets chown work unprivileged
    uid, gid = os.getuid(), os.getgid()
    (root / "etc/passwd").write_text(f"root:x:0:0::/root:/bin/sh\nedge-runtime:x:{uid}:{gid}::/:/bin/false\n")
    (root / "etc/group").write_text(f"root:x:0:\nedge-runtime:x:{gid}:\n")
    conf = SYSTEMD / "edge-runtime.tmpfiles.conf"
    proc = subprocess.run([exe, f"--root={root}", "--create", str(conf)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    keys = root / "etc/edge-runtime/keys"
    assert keys.is_dir() and keys.stat().st_mode & 0o777 == 0o750 and keys.stat().st_gid == gid


def test_env_example_names_only_real_overrides() -> None:
    names = re.findall(r"^#?(EDGE_[A-Z_]+)=", (SYSTEMD / "edge-runtime.env.example").read_text(), flags=re.M)
    assert names, "the example documents no EDGE_* variable"
    config_source = (REPO / "runtime" / "config.py").read_text()
    unknown = [n for n in names if f'"{n}"' not in config_source]
    assert unknown == [], f"edge-runtime.env.example names variables runtime/config.py does not read: {unknown}"
