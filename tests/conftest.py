"""Shared fixtures and hypothesis profiles (``dev`` by default, ``ci`` when CI is set)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from support import Lab, pool_config

settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile("ci", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def lab(tmp_path):
    """Real processes on 127.0.0.1, stopped by PID after the test whatever happens."""
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    """One vipd before one sink, shared by a module's tests (for hypothesis, which runs many examples)."""
    lab = Lab(tmp_path_factory.mktemp("relay"))
    try:
        sink = lab.sink("a")
        yield lab.vipd(pool_config(sink, admin=False)), sink
    finally:
        lab.close()
