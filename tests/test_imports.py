"""No import circles among minipeft's modules: every arrow runs one way (DESIGN.md, "an arrow
only runs downward").

The graph is read from the source, not from ``sys.modules``: an edge A -> B for every
``import`` in A of B, at the top of the file *or inside a function* (a lazy import that
closes a circle, like ``engine._F()`` importing ``functional``, hides the circle from the
interpreter but not from the reader). Importing a module of a subpackage from outside it
also runs the subpackage's ``__init__``, so that is an edge too (``minipeft/__init__.py``
itself is left out: every module is inside it).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "minipeft"


def module_names(package_dir: Path) -> dict[str, bool]:
    """Dotted name -> is a package (``__init__.py``), for every .py file under ``package_dir``."""
    out = {}
    for path in package_dir.rglob("*.py"):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = is_pkg
    return out


def _targets(node, module: str, is_pkg: bool, known: dict[str, bool]) -> list[str]:
    """The modules one import statement of ``module`` names."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:  # relative: from the module's package, up level - 1 packages
            base = module.split(".") if is_pkg else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        # "from pkg import mod" names the module pkg.mod; "from mod import name" names mod
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
    out = []
    for name in names:
        while name and name not in known and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in known:
            out.append(name)
    return out


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the modules it imports anywhere in its file (plus the subpackage inits that runs)."""
    known = module_names(package_dir)
    root = package_dir.name
    graph: dict[str, set[str]] = {m: set() for m in known}
    for module, is_pkg in known.items():
        rel = Path(*module.split(".")[1:])
        path = package_dir / rel / "__init__.py" if is_pkg else package_dir / rel.with_suffix(".py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(node, module, is_pkg, known):
                parts = target.split(".")
                for i in range(2, len(parts) + 1):  # the target and every subpackage above it
                    name = ".".join(parts[:i])
                    inside = module == name or module.startswith(name + ".")
                    if name != root and name in known and (name == target or not inside):
                        graph[module].add(name)
        graph[module].discard(module)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None when the graph is acyclic (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_minipeft_has_no_import_circles():
    cycle = find_cycle(import_graph(ROOT))
    assert cycle is None, ("import circle: " + " -> ".join(cycle) + ". Move what both sides need into a "
                           "module below them, or hand the lower module what it needs as arguments")


def test_the_graph_sees_the_engine_functional_circle(tmp_path):
    """The circle this test was written against: a lazy import inside a function still counts."""
    pkg = tmp_path / "mini"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "engine.py").write_text("class Tensor:\n    def __add__(self, o):\n        return _F().add(self, o)\n\n\n"
                                   "def _F():\n    from . import functional\n\n    return functional\n")
    (pkg / "functional.py").write_text("from .engine import Tensor\n")
    assert find_cycle(import_graph(pkg)) in (["mini.engine", "mini.functional", "mini.engine"],
                                             ["mini.functional", "mini.engine", "mini.functional"])


def test_the_graph_sees_a_circle_through_a_package_init(tmp_path):
    """quant.blockwise -> kernels.q4 -> quant.state runs quant/__init__, which imports blockwise."""
    for d in ("mini", "mini/quant", "mini/kernels"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "__init__.py").write_text("")
    (tmp_path / "mini/quant/__init__.py").write_text("from .blockwise import quantize\n")
    (tmp_path / "mini/quant/blockwise.py").write_text("from ..kernels import q4\n\n\ndef quantize():\n    pass\n")
    (tmp_path / "mini/quant/state.py").write_text("STATE = 1\n")
    (tmp_path / "mini/kernels/q4.py").write_text("from ..quant.state import STATE\n")
    cycle = find_cycle(import_graph(tmp_path / "mini"))
    assert cycle is not None and {"mini.quant", "mini.quant.blockwise", "mini.kernels.q4"} <= set(cycle)
    (tmp_path / "mini/quant/blockwise.py").write_text("def quantize():\n    pass\n")  # the arrow removed
    assert find_cycle(import_graph(tmp_path / "mini")) is None
