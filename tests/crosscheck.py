"""The reference libraries the suite compares minipeft against, and the switch that makes
their absence a failure instead of a skip.

Tests that compare with PyTorch, transformers, peft, bitsandbytes or sacrebleu ("live"
cross-checks, as opposed to the fixture files in ``tests/fixtures/``), and the data-parallel
tests on MPI ranks (mpi4py with MPICH from PyPI), skip when the
library is missing (``pytest.importorskip``), so ``pip install -e ".[dev]"`` alone runs
everything else. CI installs them (``.ci/run``, versions pinned in ``.ci/crosscheck.txt``)
and sets ``MINIPEFT_REQUIRE_CROSSCHECK=1``; then ``conftest.py`` turns every skip caused by
a missing reference library into a failure (:func:`as_failure`), so a broken install can no
longer pass as a green run that compared nothing.
"""
from __future__ import annotations

import importlib
import os
import re

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "sacrebleu", "mpi4py")  # mpi4py: the MPI ranks
ENV = "MINIPEFT_REQUIRE_CROSSCHECK"
INSTALL = ("PyTorch (CI: pip install torch==2.13.0), then pip install -r .ci/crosscheck.txt; for the MPI ranks, "
           "pip install -r .ci/distributed.txt")

# pytest.importorskip's reason: "could not import 'transformers': No module named ..."
_IMPORTORSKIP = re.compile(r"could not import '([\w.]+)'")


def required() -> bool:
    """True when ``MINIPEFT_REQUIRE_CROSSCHECK`` is 1 (CI): a missing library fails."""
    value = os.environ.get(ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def missing_library(skip_reason: str) -> str | None:
    """The reference library a skip reason says could not be imported, or None."""
    m = _IMPORTORSKIP.search(skip_reason)
    if m is None:
        return None
    top = m.group(1).split(".")[0]
    return top if top in LIBRARIES else None


def as_failure(skip_reason: str) -> str | None:
    """The failure message for a skip, when the switch is on and a reference library caused it."""
    library = missing_library(skip_reason)
    if library is None or not required():
        return None
    return (f"{ENV}=1, so a cross-check may not be skipped: {skip_reason}. "
            f"Install the reference libraries: {INSTALL}.")


def import_or_none(name: str):
    """``import name`` for a test that only adds a comparison when the library is there:
    the module, or None when it is missing - an ImportError when the switch is on."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        if required():
            raise ImportError(f"{ENV}=1 but {name} does not import ({e}); "
                              f"install the reference libraries: {INSTALL}") from e
        return None
