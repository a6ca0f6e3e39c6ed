"""Shared fixtures: run the same checks on NumPy and, on a CUDA machine, on CuPy.

``xp`` is parametrized over the backends: 'numpy' always, 'cupy' marked ``gpu`` and
skipped when CuPy or a GPU is missing. ``to_xp(a, dtype=None)`` moves a NumPy array (or
list) onto the current backend. Any test marked ``gpu`` is skipped without a GPU.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from minipeft.backend import cuda_available
from minipeft.testing import asarray_on

BACKENDS = [pytest.param("numpy", id="numpy"), pytest.param("cupy", id="cupy", marks=pytest.mark.gpu)]


@functools.lru_cache(maxsize=1)
def _gpu() -> bool:
    return cuda_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA GPU")
    if any("gpu" in item.keywords for item in items) and not _gpu():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(params=BACKENDS)
def xp(request):
    """The array module of the backend under test (numpy, or cupy on a GPU machine)."""
    if request.param == "cupy":
        if not _gpu():
            pytest.skip("needs CuPy and a CUDA GPU")
        import cupy

        return cupy
    return np


@pytest.fixture
def to_xp(xp):
    """Move an array or list onto the backend under test: ``to_xp(a, dtype=None)``."""
    return functools.partial(asarray_on, xp)
