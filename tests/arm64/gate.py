"""Whether the arm64 tests run: the developer's skip flag, and fail-not-skip under CI."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

from tests.arm64.harness import SKIP_ENV

__all__ = ["in_ci", "skip_requested", "unavailable"]


def in_ci() -> bool:
    """True on CI (``CI=true``), where the arm64 tests must run."""
    return os.environ.get("CI") == "true"


def skip_requested() -> bool:
    """``EDGEFLEET_SKIP_ARM64`` set to anything but 0, outside CI."""
    return os.environ.get(SKIP_ENV, "") not in ("", "0") and not in_ci()


def unavailable(reason: str) -> NoReturn:
    """Fail under CI (a missing prerequisite is a failure there), skip elsewhere."""
    if in_ci():
        pytest.fail(f"arm64 prerequisite missing under CI=true: {reason}", pytrace=False)
    pytest.skip(f"arm64: {reason}")
