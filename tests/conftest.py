"""Test isolation: a test whose tracked forward raised (bad-input tests) leaves that
forward's share_posterior block open until the next tracked forward closes it; close it
after each test, so that no test sees another's block."""

from __future__ import annotations

import pytest

from sbnn_addons import moments


@pytest.fixture(autouse=True)
def _close_stale_share_posterior_blocks():
    yield
    if moments._OPEN_FLOWS:
        moments._close_stale_flows(None)
