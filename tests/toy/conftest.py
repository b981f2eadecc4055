"""The toy suite's users register its checker explicitly (`ptm.toy.checkers.register()`); so do its tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _toy_checker_registered():
    from ptm.toy import checkers

    checkers.register()
