"""Marker of the tests that compare the C kernel with the PyTorch path: skipped where the
kernel cannot be built or is turned off (``SBNN_ADDONS_KERNELS=0``, the run that tests
the path CUDA tensors take)."""

from __future__ import annotations

import pytest

from sbnn_addons import kernels

needs_kernel = pytest.mark.skipif(
    not (kernels.available() and kernels.enabled()),
    reason="needs the C kernel: no C compiler here, or SBNN_ADDONS_KERNELS=0")
