"""The switch MINIPEFT_REQUIRE_CROSSCHECK=1 (tests/crosscheck.py, conftest.py): a test or
module skipped because a reference library does not import fails instead; other skips
(no GPU, no data file) stay skips. The last test checks that the libraries are really
there when the switch is on, as in CI."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from . import crosscheck

ROOT = Path(__file__).resolve().parents[1]

# What pytest.importorskip("peft") says when peft is not installed; written out, since
# in CI every reference library is installed and importorskip cannot produce it.
PEFT_MISSING = "could not import 'peft': No module named 'peft'"

INNER = textwrap.dedent(f'''
    import pytest

    def test_missing_reference():
        pytest.skip({PEFT_MISSING!r})

    def test_missing_submodule():
        pytest.skip("could not import 'transformers.models.gpt2': No module named 'transformers'")

    def test_missing_other_library():
        pytest.importorskip("minipeft_no_such_module")

    @pytest.mark.skip(reason="needs CuPy and a CUDA GPU")
    def test_gpu():
        pass

    def test_passes():
        pass
''')
INNER_MODULE = f'import pytest\npytest.skip({PEFT_MISSING!r}, allow_module_level=True)\n'


# the hooks of tests/conftest.py, for a folder outside tests/
SHIM = "from tests.conftest import pytest_configure, pytest_make_collect_report, pytest_runtest_makereport\n"


def run_inner(tmp_path, switch: str, files: dict[str, str]):
    """pytest in a subprocess on ``files`` in ``tmp_path``, with the switch set to ``switch``."""
    for name, text in {"conftest.py": SHIM, **files}.items():
        (tmp_path / name).write_text(text)
    env = {**os.environ, crosscheck.ENV: switch, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider",
                          "-o", "addopts=", "--continue-on-collection-errors",
                          "--rootdir", str(tmp_path), str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return out.returncode, out.stdout + out.stderr


def test_missing_library_is_read_from_importorskip_reasons():
    with pytest.raises(pytest.skip.Exception) as e:
        pytest.importorskip("minipeft_no_such_module")
    assert crosscheck.missing_library(str(e.value)) is None  # not a reference library
    assert crosscheck.missing_library(PEFT_MISSING) == "peft"
    assert crosscheck.missing_library("Skipped: " + PEFT_MISSING) == "peft"
    assert crosscheck.missing_library("could not import 'torch.nn': ...") == "torch"
    assert crosscheck.missing_library("needs CuPy and a CUDA GPU") is None
    assert crosscheck.missing_library("could not import 'torchvision': ...") is None


@pytest.mark.parametrize("value, on", [("", False), ("0", False), ("1", True)])
def test_the_switch(monkeypatch, value, on):
    monkeypatch.setenv(crosscheck.ENV, value)
    assert crosscheck.required() is on
    message = crosscheck.as_failure(PEFT_MISSING)
    assert (message is not None) is on
    if on:
        assert "MINIPEFT_REQUIRE_CROSSCHECK=1" in message and ".ci/crosscheck.txt" in message
    assert crosscheck.as_failure("needs CuPy and a CUDA GPU") is None


def test_a_bad_switch_value_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv(crosscheck.ENV, "yes")
    with pytest.raises(ValueError, match="MINIPEFT_REQUIRE_CROSSCHECK must be 0 or 1, got 'yes'"):
        crosscheck.required()
    code, out = run_inner(tmp_path, "yes", {"test_inner.py": "def test_x():\n    pass\n"})
    assert code == 4 and "MINIPEFT_REQUIRE_CROSSCHECK must be 0 or 1" in out, out  # usage error


def test_import_or_none(monkeypatch):
    monkeypatch.setenv(crosscheck.ENV, "0")
    assert crosscheck.import_or_none("minipeft_no_such_module") is None
    assert crosscheck.import_or_none("json") is importlib.import_module("json")
    monkeypatch.setenv(crosscheck.ENV, "1")
    with pytest.raises(ImportError, match="MINIPEFT_REQUIRE_CROSSCHECK=1 but minipeft_no_such_module "
                                          "does not import"):
        crosscheck.import_or_none("minipeft_no_such_module")


def test_without_the_switch_missing_libraries_skip(tmp_path):
    code, out = run_inner(tmp_path, "0", {"test_inner.py": INNER, "test_inner_module.py": INNER_MODULE})
    assert code == 0, out
    assert "1 passed, 5 skipped" in out, out


def test_with_the_switch_missing_reference_libraries_fail(tmp_path):
    code, out = run_inner(tmp_path, "1", {"test_inner.py": INNER, "test_inner_module.py": INNER_MODULE})
    assert code == 1, out
    assert "2 failed, 1 passed, 2 skipped, 1 error" in out, out
    assert "FAILED" in out and "test_missing_reference" in out and "test_missing_submodule" in out
    assert "a cross-check may not be skipped: Skipped: could not import 'peft'" in out, out
    assert "ERROR test_inner_module.py" in out, out                     # the module skip, too
    assert "SKIPPED [1] " in out and "minipeft_no_such_module" in out  # not a reference library
    assert "needs CuPy and a CUDA GPU" in out                          # gpu skips stay skips


def test_the_reference_libraries_import_when_required():
    """In CI (switch on) every reference library must import; locally this checks nothing."""
    if not crosscheck.required():
        pytest.skip(f"{crosscheck.ENV} is not 1")
    for name in crosscheck.LIBRARIES:
        importlib.import_module(name)
