"""Shared fixtures: run the same checks on NumPy and, on a CUDA machine, on CuPy.

``xp`` is parametrized over the backends: 'numpy' always, 'cupy' marked ``gpu`` and
skipped when CuPy or a GPU is missing. ``to_xp(a, dtype=None)`` moves a NumPy array (or
list) onto the current backend. Any test marked ``gpu`` is skipped without a GPU.

With ``MINIPEFT_REQUIRE_CROSSCHECK=1`` (set by ``.ci/run``) a test or module skipped because a
reference library (torch, transformers, peft, bitsandbytes, sacrebleu) does not import is
reported as failed instead (``tests/crosscheck.py``).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from minipeft.backend import cuda_available
from minipeft.testing import asarray_on

from . import crosscheck

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


def pytest_configure(config):
    try:
        crosscheck.required()
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail_missing_reference(report):
    """A skip for a missing reference library becomes a failure when cross-checks are required."""
    if report.skipped and (message := crosscheck.as_failure(_skip_reason(report))):
        report.outcome, report.longrepr = "failed", message
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    return _fail_missing_reference((yield))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    return _fail_missing_reference((yield))


@pytest.fixture(scope="session")
def cp():
    """CuPy, for the ``gpu`` tests of the kernels (only requested by tests that are skipped without a GPU)."""
    from minipeft.backend import get_xp

    return get_xp("cuda")


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
