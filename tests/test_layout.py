"""The house's layout (README "Layout"): the course apart from the library, and modules a reader can hold.

The course (``minipeft.lessons`` with its figures, ``minipeft.claims``, ``minipeft.figures``)
may import anything; nothing outside it may import the course, so the core and the
training/inference machinery stand without it. No module in ``minipeft/`` passes 500 lines.
"""
from __future__ import annotations

from pathlib import Path

from .test_imports import ROOT, import_graph

COURSE = ("minipeft.lessons", "minipeft.claims", "minipeft.figures")
MAX_LINES = 500


def in_course(module: str) -> bool:
    return any(module == c or module.startswith(c + ".") for c in COURSE)


def test_nothing_outside_the_course_imports_it():
    graph = import_graph(ROOT)
    assert any(in_course(m) for m in graph), "the course packages should be found under minipeft/"
    bad = sorted(f"{m} -> {d}" for m, deps in graph.items() if not in_course(m) for d in deps if in_course(d))
    assert not bad, f"library modules import the course: {bad}; move the shared code out of the course"


def test_no_module_passes_500_lines():
    sizes = {p.relative_to(ROOT.parent).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
             for p in ROOT.rglob("*.py")}
    assert len(sizes) > 50, "minipeft/ should hold its modules"
    long = {p: n for p, n in sizes.items() if n > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by topic): {long}"


def test_package_data_ships_every_kernel_source():
    """A plain (non-editable) install carries what NVRTC compiles: every ``.cu`` file and every header a
    ``.cu`` file includes must match one of pyproject's ``package-data`` patterns."""
    import fnmatch
    import re
    import tomllib

    project = tomllib.loads((ROOT.parent / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = project["tool"]["setuptools"]["package-data"]["minipeft"]
    kernels = ROOT / "kernels"
    sources = sorted(kernels.glob("*.cu"))
    assert sources, "minipeft/kernels/ should hold the .cu sources"
    needed = {p.name for p in sources}
    for p in sources:
        needed |= set(re.findall(r'#include\s+"([^"]+)"', p.read_text(encoding="utf-8")))
    missing = sorted(name for name in needed
                     if not any(fnmatch.fnmatch(f"kernels/{name}", pat) for pat in patterns))
    assert not missing, (f"pyproject.toml [tool.setuptools.package-data] misses {missing}: a plain "
                         "`pip install .` would not ship them and the kernels would not compile")
