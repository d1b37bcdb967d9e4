"""`toolchain fleet deploy` / `fleet rollback` over 50 simulated devices on a real Mosquitto.

The devices (:mod:`tests.simdevice`) hold real model stores and run the service's own deployer:
each fetches its bundle (file://), verifies it into its store, and judges it with the real
shadow/canary gates on digits it serves meanwhile. The bundles are built by the toolchain for
rpi4 and rpi5 from the digits CNN; the failing one has the classifier's rows rotated (class k
scores as k+1), so it really disagrees with the active model. The operator is the real CLI.
"""

from __future__ import annotations

import functools
import http.server
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.signing import load_public_key
from tests.broker import Broker, module_broker_fixture  # noqa: F401  (registers the `mqtt` fixture)
from tests.conftest import Cli, run_cli
from tests.simdevice import SimFleet
from toolchain.errors import UsageError
from toolchain.fleet import Ack, DeviceStatus
from toolchain.fleet_deploy import (
    Limit,
    Offer,
    add_deltas,
    load_offers,
    outcome_of,
    parse_limit,
    parse_share,
    plan_rollout,
)

N_DEVICES = 50
# Small gates keep 50 devices quick; the latency ratio is loose on purpose: 50 devices share 2 cores,
# so p95 of a 0.1 ms model is noise here (the latency gate has its own tests in test_rollout_service).
GATES = ["min_samples=20", "canary_share=0.5", "max_p95_ratio=1000", "max_duration_s=60"]


def _build(weights: Path, profile: str, version: str, digits_dirs: Any, key: Path, out: Path) -> Path:
    from runtime.profile import load_profile
    from toolchain.pipeline import BuildRequest, build

    calib, val = digits_dirs
    res = build(
        BuildRequest(
            model="toolchain.examples:digits_cnn",
            weights=weights,
            input_shapes=((1, 1, 8, 8),),
            profile=load_profile(profile),
            output_dir=out / f"{profile}-{version}",
            key=key,
            calibration=str(calib),
            validation=str(val),
            name="digits",
            version=version,
            bench_iterations=0,
        )
    )
    assert res.bundle is not None
    return Path(res.bundle)


@pytest.fixture(scope="module")
def bundles(bundle: Any, digits_model: Any, digits_dirs: Any, keys: Any, tmp_path_factory: Any) -> dict[str, Path]:
    """rpi4/rpi5 1.0.0 (factory), 1.1.0 (same weights, good), and rpi4 1.1.1 with disagreeing weights."""
    import torch

    _, weights, _ = digits_model
    out = tmp_path_factory.mktemp("fleet-bundles")
    state = torch.load(weights)
    state["11.weight"], state["11.bias"] = state["11.weight"].roll(1, 0), state["11.bias"].roll(1, 0)
    bad_weights = out / "rotated.pt"
    torch.save(state, bad_weights)
    return {
        "rpi4-1.0.0": Path(bundle[0]),
        "rpi5-1.0.0": _build(weights, "rpi5", "1.0.0", digits_dirs, keys[0], out),
        "rpi4-1.1.0": _build(weights, "rpi4", "1.1.0", digits_dirs, keys[0], out),
        "rpi5-1.1.0": _build(weights, "rpi5", "1.1.0", digits_dirs, keys[0], out),
        "rpi4-1.1.1-bad": _build(bad_weights, "rpi4", "1.1.1", digits_dirs, keys[0], out),
    }


def _fleet(
    mqtt: Broker, operator: tuple[Path, Path], keys: Any, bundles: dict[str, Path], root: Path, name: str, **kw: Any
) -> SimFleet:
    started = time.monotonic()
    sims = SimFleet(
        mqtt.host,
        mqtt.port,
        fleet=name,
        count=kw.pop("count", N_DEVICES),
        trusted_keys=[load_public_key(operator[1])],
        bundle_keys=[load_public_key(keys[1])],
        root=root,
        profiles=kw.pop("profiles", ("rpi4", "rpi5")),
        models={"rpi4": bundles["rpi4-1.0.0"], "rpi5": bundles["rpi5-1.0.0"]},
        **kw,
    ).start()
    print(f"\n{len(sims.devices)} simulated devices with model stores up in {time.monotonic() - started:.2f} s")
    return sims


def fleet_cli(mqtt: Broker, operator: tuple[Path, Path], fleet: str, *args: str) -> Cli:
    return run_cli(
        "fleet", *args, "--broker", f"{mqtt.host}:{mqtt.port}", "--fleet", fleet, "--key", str(operator[0]), timeout=180
    )


def _doc(res: Cli) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads(res.out)
    except ValueError:
        raise AssertionError(f"not JSON (exit {res.code}):\n{res.out}\n{res.err}") from None
    return doc


def _serving(sims: SimFleet) -> dict[str, tuple[str, str]]:
    out = {}
    for name, dev in sims.devices.items():
        assert dev.models is not None
        m = dev.models.serving()
        out[name] = (m.manifest.profile.name, m.version)
    return out


def _deploy(mqtt: Broker, operator: tuple[Path, Path], fleet: str, *bundles: Path, extra: tuple[str, ...] = ()) -> Cli:
    flags = [a for b in bundles for a in ("--bundle", str(b))]
    return fleet_cli(
        mqtt, operator, fleet, "deploy", *flags, "--all", "--canary", "10%", "--wait-healthy",
        "--gates", *GATES, "--timeout", "90", *extra,
    )  # fmt: skip


def test_good_bundles_roll_out_to_all_canary_first(
    mqtt: Broker, operator: tuple[Path, Path], keys: Any, bundles: dict[str, Path], tmp_path: Path
) -> None:
    sims = _fleet(mqtt, operator, keys, bundles, tmp_path, "good")
    try:
        started = time.monotonic()
        res = _deploy(mqtt, operator, "good", bundles["rpi4-1.1.0"], bundles["rpi5-1.1.0"], extra=("--json",))
        print(f"rollout to {N_DEVICES} devices: {time.monotonic() - started:.1f} s")
        doc = _doc(res)
        assert res.code == 0, (doc["stop_reason"], doc["summary"], res.err[-2000:])
        (canary_name, canary), (wave_name, wave) = ((p["name"], p["devices"]) for p in doc["phases"])
        assert (canary_name, wave_name) == ("canary", "wave 1")
        assert len(canary) == 6 and len(wave) == N_DEVICES - 6  # ceil(10% of 25) for each profile
        assert {sims.devices[d].profile for d in canary} == {"rpi4", "rpi5"}
        rows = {r["device"]: r for r in doc["devices"]}
        assert doc["summary"] == {"active": N_DEVICES} and doc["ok"] is True
        assert all(r["metrics"]["agreement"] >= 0.9 and r["state"] == "active" for r in rows.values())
        # every device serves the bundle built for its own profile, and its store keeps the old one
        assert _serving(sims) == {d: (dev.profile, "1.1.0") for d, dev in sims.devices.items()}
        for dev in sims.devices.values():
            assert dev.models is not None
            held = [(m.profile, m.version) for m in dev.models.store.list()]
            assert held == [(dev.profile, "1.1.0"), (dev.profile, "1.0.0")]
        # the canary was done before the rest was even sent anything
        events = {d: dev.models.events for d, dev in sims.devices.items() if dev.models is not None}
        canary_done = max(t for d in canary for t, kind, _, _ in events[d] if kind == "rollout.active")
        wave_start = min(t for d in wave for t, kind, _, _ in events[d] if kind == "rollout.downloading")
        assert canary_done < wave_start
        # the retained status says so too
        status = _doc(fleet_cli(mqtt, operator, "good", "status", "--no-query", "--json"))
        assert {r["version"] for r in status["devices"]} == {"1.1.0"}
    finally:
        sims.stop()


def test_failing_canary_stops_and_rolls_back(
    mqtt: Broker, operator: tuple[Path, Path], keys: Any, bundles: dict[str, Path], tmp_path: Path
) -> None:
    sims = _fleet(mqtt, operator, keys, bundles, tmp_path, "bad")
    try:
        res = _deploy(mqtt, operator, "bad", bundles["rpi4-1.1.1-bad"], bundles["rpi5-1.1.0"], extra=("--json",))
        doc = _doc(res)
        assert res.code == 1 and doc["stopped"] is True and doc["ok"] is False, res.err[-2000:]
        canary = doc["phases"][0]["devices"]
        assert len(canary) == 6 and "canary" in doc["stop_reason"]
        rows = {r["device"]: r for r in doc["devices"]}
        for d, dev in sims.devices.items():
            row = rows[d]
            assert row["version_now"] == "1.0.0", row
            if d not in canary:  # never sent anything
                assert row["outcome"] == "not_sent" and dev.channel is not None
                assert dev.channel.counts["received"] == 0 and dev.models is not None and not dev.models.events
            elif dev.profile == "rpi4":  # the device's agreement gate rolled the rotated weights back
                assert row["outcome"] == "rolled_back" and "agreement" in row["reason"], row
                assert row["metrics"]["agreement"] < 0.5 and row["rollback"] is None
            else:  # good on its own, rolled back by the operator because the rollout stopped
                assert (row["outcome"], row["rollback"]) == ("active", "ok"), row
        assert _serving(sims) == {d: (dev.profile, "1.0.0") for d, dev in sims.devices.items()}
    finally:
        sims.stop()


def test_device_without_a_bundle_for_its_profile_is_skipped_and_rollback_command(
    mqtt: Broker, operator: tuple[Path, Path], keys: Any, bundles: dict[str, Path], tmp_path: Path
) -> None:
    sims = _fleet(mqtt, operator, keys, bundles, tmp_path, "mixed", count=4, profiles=("rpi4", "rpi5", "rpi3"))
    try:
        res = _deploy(mqtt, operator, "mixed", bundles["rpi4-1.1.0"])
        assert res.code == 0, res.out + res.err
        for device, reason in (("sim-001", "no bundle for profile rpi5"), ("sim-002", "no bundle for profile rpi3")):
            line = next(ln for ln in res.out.splitlines() if device in ln)
            assert "skipped" in line and reason in line, res.out
        assert "2 active" in res.out and "2 skipped" in res.out
        assert sims.devices["sim-000"].version == sims.devices["sim-003"].version == "1.1.0"
        assert sims.devices["sim-001"].version == "1.0.0"

        back = fleet_cli(mqtt, operator, "mixed", "rollback", "--device", "sim-003", "--version", "1.0.0", "--json")
        assert back.code == 0, back.out + back.err
        (row,) = _doc(back)["devices"]
        assert row["ack"]["active"] == {"name": "digits", "version": "1.0.0"}
        assert row["ack"]["from"] == {"name": "digits", "version": "1.1.0"}
        assert sims.devices["sim-003"].status()["version"] == "1.0.0"
    finally:
        sims.stop()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize("via", ["http", "mqtt"])
def test_bundles_travel_over_http_and_mqtt(
    via: str, mqtt: Broker, operator: tuple[Path, Path], keys: Any, bundles: dict[str, Path], tmp_path: Path
) -> None:
    offered = bundles["rpi4-1.1.0"]
    handler = functools.partial(_Quiet, directory=str(offered.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sims = _fleet(mqtt, operator, keys, bundles, tmp_path, f"via-{via}", count=2, profiles=("rpi4",))
    try:
        extra = ["--via", via, "--json"]
        if via == "http":
            extra += ["--base-url", f"http://127.0.0.1:{server.server_port}/"]
        res = _deploy(mqtt, operator, f"via-{via}", offered, extra=tuple(extra))
        doc = _doc(res)
        assert res.code == 0, (doc["summary"], doc["devices"], res.err[-2000:])
        assert doc["bundles"][0]["url"].startswith(f"{via}://")
        assert {d.version for d in sims.devices.values()} == {"1.1.0"}
    finally:
        sims.stop()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("via", ["file", "mqtt"])
def test_devices_on_the_old_version_take_a_delta(
    via: str, mqtt: Broker, operator: tuple[Path, Path], keys: Any, bundles: dict[str, Path], tmp_path: Path
) -> None:
    """--delta-from: devices running 1.0.0 rebuild 1.1.0 from the bundle they hold (and verify it as any other)."""
    sims = _fleet(mqtt, operator, keys, bundles, tmp_path, f"delta-{via}", count=4)
    try:
        new, old = (bundles["rpi4-1.1.0"], bundles["rpi5-1.1.0"]), (bundles["rpi4-1.0.0"], bundles["rpi5-1.0.0"])
        extra = [a for b in old for a in ("--delta-from", str(b))]
        res = _deploy(mqtt, operator, f"delta-{via}", *new, extra=(*extra, "--via", via, "--json"))
        doc = _doc(res)
        assert res.code == 0, (doc["summary"], doc["devices"], res.err[-2000:])
        for offered in doc["bundles"]:
            delta = offered["delta"]
            assert delta["from"]["version"] == "1.0.0" and delta["url"].startswith(f"{via}://")
            assert delta["size"] < offered["size"] / 4  # same weights: the delta is a fraction of the bundle
            assert Path(delta["path"]).name == f"{Path(offered['path']).stem}.from-1.0.0.delta"
        assert _serving(sims) == {d: (dev.profile, "1.1.0") for d, dev in sims.devices.items()}
        for dev in sims.devices.values():
            assert dev.models is not None
            stored = dev.models.store.get("digits", "1.1.0")
            assert stored.source == _delta_url(doc, dev.profile)  # rebuilt from the delta, not fetched whole
            kinds = [kind for _, kind, _, _ in dev.models.events]
            assert "rollout.delta_failed" not in kinds
    finally:
        sims.stop()


def _delta_url(doc: dict[str, Any], profile: str) -> str:
    (offered,) = [b for b in doc["bundles"] if b["profile"] == profile]
    return str(offered["delta"]["url"])


def test_add_deltas_refuses_an_old_bundle_no_offer_matches(bundles: dict[str, Path]) -> None:
    offers = load_offers([bundles["rpi4-1.1.0"]])
    with pytest.raises(UsageError, match="no --bundle of that model for that profile") as err:
        add_deltas(offers, [bundles["rpi5-1.0.0"]])
    assert err.value.flag == "--delta-from"
    with pytest.raises(UsageError, match="offered version"):
        add_deltas(offers, [bundles["rpi4-1.1.0"]])
    offer = add_deltas(offers, [bundles["rpi4-1.0.0"]])["rpi4"]
    assert offer.delta is not None and offer.delta.path.parent == bundles["rpi4-1.1.0"].parent
    assert offer.delta is not None
    assert offer.delta_for("digits", "1.0.0") is offer.delta
    assert offer.delta_for("digits", "0.9.0") is None and offer.delta_for("other", "1.0.0") is None


# --- usage, without devices -----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["deploy", "rollback"])
def test_deploy_and_rollback_have_help(command: str) -> None:
    res = run_cli("fleet", command, "--help")
    assert res.code == 0 and "usage: toolchain fleet" in res.out and "--broker" in res.out


def test_bad_deploy_usage_is_exit_2(bundles: dict[str, Path], operator: tuple[Path, Path], tmp_path: Path) -> None:
    cases = [
        (["--bundle", str(bundles["rpi4-1.1.0"]), "--all", "--canary", "150%"], "--canary"),
        (["--bundle", str(bundles["rpi4-1.1.0"]), "--bundle", str(bundles["rpi4-1.0.0"]), "--all"], "rpi4"),
        (["--bundle", str(tmp_path / "missing.tar"), "--all"], "missing.tar"),
        (["--bundle", str(bundles["rpi4-1.1.0"]), "--all", "--gates", "min_agreemnt=0.9"], "min_agreemnt"),
        (["--bundle", str(bundles["rpi4-1.1.0"]), "--all", "--via", "http"], "--base-url"),
        (["--bundle", str(bundles["rpi4-1.1.0"])], "--device/--group/--all"),
    ]
    for args, needle in cases:
        res = run_cli("fleet", "deploy", *args, "--fleet", "f", "--key", str(operator[0]))
        assert res.code == 2 and "Traceback" not in res.err, (args, res.err)
        lines = [ln for ln in res.err.splitlines() if ln.startswith("toolchain: error:")]
        assert len(lines) == 1 and needle in lines[0], (args, res.err)


# --- the planner and the outcome mapping, without a broker ----------------------------------------


def _offer(profile: str, version: str = "1.1.0") -> Offer:
    return Offer(Path(f"{profile}.tar"), "digits", version, profile, "0" * 64, 1, f"file:///{profile}.tar")


def _status(device: str, profile: str | None, *, online: bool = True, version: str = "1.0.0") -> DeviceStatus:
    return DeviceStatus(device, online, group="g", profile=profile, model="digits", version=version)


def test_plan_takes_a_canary_from_every_profile_and_lists_every_skip() -> None:
    statuses = {f"r4-{i:02d}": _status(f"r4-{i:02d}", "rpi4") for i in range(21)}
    statuses |= {f"r5-{i}": _status(f"r5-{i}", "rpi5") for i in range(3)}
    statuses |= {
        "off": _status("off", "rpi4", online=False),
        "odd": _status("odd", "rpi3"),
        "anon": _status("anon", None),
        "done": _status("done", "rpi4", version="1.1.0"),
    }
    plan = plan_rollout(statuses, {"rpi4": _offer("rpi4"), "rpi5": _offer("rpi5")}, canary=0.1, wave=8)
    names = [name for name, _ in plan.phases]
    assert names == ["canary", "wave 1", "wave 2", "wave 3"]
    canary = [a.device for a in plan.phases[0][1]]
    assert canary == ["r4-00", "r4-01", "r4-02", "r5-0"]  # ceil(2.1) of rpi4, at least one of rpi5
    assert [len(p) for _, p in plan.phases[1:]] == [8, 8, 4]
    assert all(a.offer.profile == statuses[a.device].profile for a in plan.assignments)
    skipped = {s.device: (s.reason, s.current) for s in plan.skipped}
    assert skipped == {
        "off": ("offline", False),
        "odd": ("no bundle for profile rpi3", False),
        "anon": ("its status names no profile", False),
        "done": ("already runs digits 1.1.0", True),
    }
    named = plan_rollout(statuses, {"rpi4": _offer("rpi4")}, devices=["r4-05", "ghost", "r5-1"])
    assert [a.device for a in named.assignments] == ["r4-05"]
    assert {s.device for s in named.skipped} == {"ghost", "r5-1"}


@pytest.mark.parametrize(
    ("ack", "waited", "expected"),
    [
        (None, True, "timeout"),
        (Ack("d", "accepted"), True, "timeout"),
        (Ack("d", "accepted"), False, "accepted"),
        (Ack("d", "ok", result={"outcome": "active", "state": "active"}), True, "active"),
        (Ack("d", "error", "agreement: 0.1 < 0.9", {"outcome": "rolled_back"}), True, "rolled_back"),
        (Ack("d", "refused", "wrong-profile: …"), True, "refused"),
        (Ack("d", "error", "boom"), True, "error"),
        (Ack("d", "ok", result={}), True, "error"),  # an ok without an outcome is not trusted
    ],
)
def test_outcome_of_a_final_ack(ack: Ack | None, waited: bool, expected: str) -> None:
    assert outcome_of(ack, waited=waited)[0] == expected


def test_failure_limits() -> None:
    assert parse_limit("0").exceeded(1, 6) and not parse_limit("0").exceeded(0, 6)
    assert not parse_limit("2").exceeded(2, 6) and parse_limit("2").exceeded(3, 6)
    assert not parse_limit("20%").exceeded(1, 6) and parse_limit("20%").exceeded(2, 6)
    assert parse_share("10%", "--canary") == pytest.approx(0.1) == parse_share("0.1", "--canary")


@given(st.text(max_size=20))
def test_share_and_limit_parsers_take_any_text(text: str) -> None:
    for parse in (lambda t: parse_share(t, "--canary"), parse_limit):
        try:
            value = parse(text)
        except UsageError:
            continue
        assert isinstance(value, float | Limit)
