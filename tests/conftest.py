"""Test isolation: a test whose tracked forward raised (bad-input tests) leaves that
forward's share_posterior block open until the next tracked forward closes it; close it
after each test, so that no test sees another's block. A benchmark script's ``main()``
sets torch's thread count: restore it after each test (float sums, and so the spikes of
a small random network, depend on it)."""

from __future__ import annotations

import pytest
import torch

from sbnn_addons import moments


@pytest.fixture(autouse=True)
def _restore_thread_count():
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _close_stale_share_posterior_blocks():
    yield
    if moments._OPEN_FLOWS:
        moments._close_stale_flows(None)
