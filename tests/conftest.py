"""Shared test setup.

Environment for hermetic gs:// tests must be set before gcsfs / tensorstore / google-auth are imported, so it is
set here at import time (see docs/gcs.md). Eight fake CPU devices give real multi-device sharding.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
for _k, _v in {
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
    "FSSPEC_GCS_TOKEN": "anon",
    "FSSPEC_GS_TOKEN": "anon",
    "NO_GCE_CHECK": "true",
    "GCE_METADATA_HOST": "127.0.0.1:9",
    "GCE_METADATA_ROOT": "127.0.0.1:9",
    "GCE_METADATA_IP": "127.0.0.1:9",
    "GOOGLE_CLOUD_PROJECT": "test",
    "EPATH_USE_TF": "false",
}.items():
    os.environ.setdefault(_k, _v)

import pytest  # noqa: E402

from ptm.testing.gcs import GcsEmulator  # noqa: E402


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
