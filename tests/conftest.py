"""Shared test setup.

Environment for hermetic gs:// tests must be set before gcsfs / tensorstore / google-auth are imported, so it is
set here at import time (see docs/gcs.md). Eight fake CPU devices give real multi-device sharding.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
from ptm.testing.gcs import CLIENT_ENV, GcsEmulator  # noqa: E402  (stdlib only: jax and gcsfs not imported yet)

for _k, _v in CLIENT_ENV.items():  # before any client library is imported
    os.environ.setdefault(_k, _v)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gcs_emulator():
    """A fake-gcs-server on 127.0.0.1 for the whole session; yields the emulator handle."""
    emu = GcsEmulator()
    try:
        emu.start()
    except Exception as e:  # the wrapper package is a test extra
        pytest.skip(f"fake-gcs-server unavailable: {e}")
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def gcs_bucket(gcs_emulator, request) -> str:
    """A fresh, empty bucket; returns its gs:// URL (no trailing slash)."""
    return gcs_emulator.new_bucket(request.node.name)
