"""Test isolation. A test whose tracked forward raised (bad-input tests) leaves that
forward's share_posterior block open until the next tracked forward closes it; close it
after each test, so that no test sees another's block. A benchmark script's ``main()``
sets torch's thread count: restore it after each test (float sums, and so the spikes of
a small random network, depend on it)."""

from __future__ import annotations

import sys

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


@pytest.fixture(autouse=True)
def _forget_snntorch_neurons():
    """snnTorch lists every neuron ever built (``SpikingNeuron.instances``) and
    ``snntorch.utils.reset`` walks the whole list: in a compiled step, every neuron of every
    earlier test became part of the trace (tests late in a run compiled 5-10x slower). Each
    test builds its own models: forget the earlier tests' neurons."""
    yield
    host = sys.modules.get("snntorch._neurons.neurons")
    if host is not None:
        host.SpikingNeuron.instances.clear()


# Files whose tests compile graphs or train for tens of seconds each. Collected first, so
# that under ``pytest -n 2 --dist worksteal`` the two workers start on them and finish on
# short tests, instead of one worker running a long test alone at the end.
_LONG_FILES = ("test_compile.py", "test_compile_hosts.py", "test_ep.py", "test_bench.py",
               "test_models.py", "test_docs.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return _LONG_FILES.index(name) if name in _LONG_FILES else len(_LONG_FILES)

    items.sort(key=rank)  # stable: each file keeps its order
