"""The README's reference sections are kept in sync with the code."""

from __future__ import annotations

import dataclasses
import re

from runtime.config import ServiceConfig
from runtime.profile import DeviceProfile
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def _keys(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_every_config_key_is_documented() -> None:
    section = README.split("### Device config")[1].split("### ")[0]
    for f in dataclasses.fields(ServiceConfig):
        assert f"`{f.name}`" in section or f"[{f.name}]" in section, f.name
        factory = f.default_factory
        if factory is not dataclasses.MISSING and isinstance(factory, type) and dataclasses.is_dataclass(factory):
            row = next(line for line in section.splitlines() if f"[{f.name}]" in line)
            for sub in _keys(factory):
                assert sub in row, f"{f.name}.{sub}"


def test_every_profile_key_is_documented() -> None:
    section = README.split("### Device profiles")[1].split("### ")[0]
    for f in dataclasses.fields(DeviceProfile):
        assert f.name in section, f.name


def test_every_cli_command_is_documented() -> None:
    from runtime.cli import make_parser as runtime_parser
    from toolchain.cli import make_parser as toolchain_parser

    for prog, parser in (("toolchain", toolchain_parser()), ("edge-runtime", runtime_parser())):
        sub = next(a for a in parser._actions if a.dest == "command")
        for name in sub.choices:  # type: ignore[union-attr]
            assert re.search(rf"{prog} {name}\b", README), f"{prog} {name}"
