"""Fixtures for the merge-search tests: a small pool of real ptm checkpoints (Orbax + ptm/metadata)."""

from __future__ import annotations

import pytest
from searchhelpers import make_pool


@pytest.fixture(scope="session")
def pool_dir(tmp_path_factory):
    return make_pool(tmp_path_factory.mktemp("pool"))
