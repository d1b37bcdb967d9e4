"""Root conftest of the tests copied into the emulated arm64 root: Hypothesis settings for emulation.

Copied to ``/opt/edgefleet-tests/repo/conftest.py`` by the harness; not used on the host. Emulated
code runs many times slower, so no test may fail on a deadline or a too-slow health check; tests that
set their own ``max_examples`` keep it.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "arm64-emulated",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("arm64-emulated")
