"""Recorded lesson results: find them, load them, and note every number a claim reads.

Layout (``benchmarks/results/``): one folder per run, ``<device>-<YYYY-MM-DD>/``
(``h200-2026-12-02``, ``cpu-2026-12-01``), holding ``<lesson>.json`` -- the dict a
lesson's ``main`` returned, written by ``--json``. ``<lesson>_cuda.json`` and
``<lesson>_cpu.json`` are read too, and ``<lesson>_part<N>.json`` (a lesson run in parts, one process
each: every part is a run of the lesson that holds only its part's numbers). A folder named ``cpu-...`` is a CPU run; any other
device name is a GPU run. Extra files outside that tree (``figures/transfer_data.json``,
the transfer lesson's saved data) are read as runs of their lesson, dated by their own
``date`` field.

:func:`load_results` keeps, per lesson, the newest run of the preferred kind (GPU over CPU
by default), and the other runs in order: a claim whose numbers that run lacks is judged
on the next run that has them. A claim reads numbers through a :class:`Reader`, which raises
:class:`Missing` (-> verdict 'not-attempted', with the reason) when a run or key is absent
and records each key path read, so the claims table can name its exact source.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

_RUN_DIR = re.compile(r"^(?P<device>[A-Za-z0-9_.]+)-(?P<date>\d{4}-\d{2}-\d{2})$")
PREFER = ("gpu", "cpu", "newest")
# lesson -> files (relative to the repository root) read as runs of that lesson besides benchmarks/results/
DEFAULT_EXTRA = {"transfer": ("figures/transfer_data.json",)}


class Missing(Exception):
    """A claim cannot be measured: a recorded run or a key in it is absent, or the claim is out of scale."""


@dataclass
class Run:
    """One recorded result of a lesson."""

    lesson: str
    path: Path  # the JSON file
    label: str  # how the claims table names it (path relative to the repository)
    kind: str  # 'gpu' or 'cpu'
    date: str  # YYYY-MM-DD ('' if unknown)
    data: dict = field(repr=False, default_factory=dict)
    shared: bool = False  # its timings were taken while other runs shared the machine (SHARED_MACHINE file)


def _normalize(lesson: str, data: dict) -> dict:
    """The transfer lesson's saved data keeps its analysis under 'analysis': lift it to the lesson-dict layout."""
    if lesson == "transfer" and isinstance(data.get("analysis"), dict) and "fits" not in data:
        return {**data, **data["analysis"]}
    return data


@functools.lru_cache(maxsize=None)
def lesson_names() -> tuple[str, ...]:
    """The lessons (modules of ``minipeft.lessons``): only files named after one are read as lesson results.

    A lesson defines ``main()`` and ends in ``finish()``; the course's helper modules (figures, transfer_runs,
    e2e_eval) do not. Read once per process: ``_lesson_of`` asks for every recorded file.
    """
    import pkgutil

    from .. import lessons

    def is_lesson(m) -> bool:
        f = Path(lessons.__path__[0]) / f"{m.name}.py"
        return (not m.ispkg and not m.name.startswith("_") and f.is_file()
                and all(k in f.read_text() for k in ("\ndef main(", "finish(")))

    return tuple(sorted(m.name for m in pkgutil.iter_modules(lessons.__path__) if is_lesson(m)))


_STEM = re.compile(r"^(?P<lesson>.+?)(_cuda|_cpu|_gpu)?(_part\d+)?$")


def _lesson_of(stem: str) -> str | None:
    """The lesson a file stem records ('qlora_cuda' -> 'qlora', 'peft_methods_part3' -> 'peft_methods': a
    lesson run in parts, e.g. ``--parts 3``, one process each), or None for other files (benchmark outputs)."""
    m = _STEM.match(stem)
    return m["lesson"] if m and m["lesson"] in lesson_names() else None


def _rel(path: Path, repo: Path) -> str:
    try:
        return path.resolve().relative_to(repo.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


SHARED_MACHINE = "SHARED_MACHINE"  # in a run folder: the JSON files (one per line) whose timings were shared


def _shared_machine(d: Path) -> set[str]:
    """Names listed in ``d/SHARED_MACHINE`` ('#' starts a comment): runs made while others shared the machine,
    so their timings are not speed measurements (claims about speed read the next run instead)."""
    f = d / SHARED_MACHINE
    if not f.is_file():
        return set()
    return {line.split("#", 1)[0].strip() for line in f.read_text().splitlines()} - {""}


def discover(root, repo=None, extra=None) -> list[Run]:
    """Every recorded run under ``root`` (and the ``extra`` files), unloaded (``data`` empty)."""
    root = Path(root)
    repo = Path(repo) if repo is not None else (root.parent.parent if root.parent.name == "benchmarks" else Path("."))
    runs = []
    if root.is_dir():
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            m = _RUN_DIR.match(d.name)
            if not m:
                continue
            kind = "cpu" if m["device"].lower() == "cpu" else "gpu"
            shared = _shared_machine(d)
            for f in sorted(d.glob("*.json")):
                lesson = _lesson_of(f.stem)
                if lesson is not None:  # other JSON (benchmark outputs) is not a lesson's result
                    runs.append(Run(lesson, f, _rel(f, repo), kind, m["date"], shared=f.name in shared))
    for lesson, files in (DEFAULT_EXTRA if extra is None else extra).items():
        for name in files:
            f = Path(name) if Path(name).is_absolute() else repo / name
            if f.is_file():
                runs.append(Run(lesson, f, _rel(f, repo), "", ""))
    return runs


def _load(run: Run) -> Run:
    try:
        data = json.loads(run.path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{run.path}: cannot read recorded results ({e}); fix or remove the file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{run.path}: expected a JSON object (a lesson's result dict), got {type(data).__name__}")
    if not run.kind:  # an extra file: its own device and date fields say what it is
        run.kind = "cpu" if str(data.get("device", "")).lower() == "cpu" else "gpu"
        run.date = str(data.get("date", ""))[:10]
    run.data = _normalize(run.lesson, data)
    return run


class Results:
    """The chosen run of each lesson (``results["qlora"]`` -> :class:`Run`)."""

    def __init__(self, runs: dict[str, Run], searched: str = "", others: dict | None = None):
        self.runs = dict(runs)
        self.searched = searched  # where runs were looked for (for 'not-attempted' notes)
        self.others = dict(others or {})  # lesson -> its other recorded runs, in order of preference

    def alternatives(self) -> list["Results"]:
        """The same results with each lesson's k-th other run in place of its chosen one (k = 1, 2, ...).

        A claim whose numbers the chosen run lacks (an older run, a lesson changed since) is
        judged on the preferred run that has them.
        """
        depth = max((len(v) for v in self.others.values()), default=0)
        return [Results({k: (self.others.get(k, [])[i] if i < len(self.others.get(k, [])) else r)
                         for k, r in self.runs.items()}, self.searched) for i in range(depth)]

    @classmethod
    def from_dicts(cls, dicts: dict[str, dict], label: str = "memory") -> "Results":
        """Results from in-memory lesson dicts (tests, notebooks): ``{lesson: result dict}``."""
        return cls({k: Run(k, Path(f"{label}/{k}.json"), f"{label}/{k}.json", "cpu", "", _normalize(k, v))
                    for k, v in dicts.items()}, label)

    def __contains__(self, lesson: str) -> bool:
        return lesson in self.runs

    def __getitem__(self, lesson: str) -> Run:
        return self.runs[lesson]

    def lessons(self) -> list[str]:
        return sorted(self.runs)


def load_results(root="benchmarks/results", prefer: str = "gpu", repo=None, extra=None) -> Results:
    """Per lesson, the newest recorded run of the preferred kind under ``root`` (and ``extra`` files).

    ``prefer``: 'gpu' (a GPU run wins over any CPU run, newest first), 'cpu', or
    'newest' (the newest run of either kind). ``extra``: ``{lesson: (file, ...)}``
    relative to ``repo`` (default: the repository holding ``root``); default
    ``figures/transfer_data.json`` for the transfer lesson.
    """
    if prefer not in PREFER:
        raise ValueError(f"prefer must be one of {PREFER}, got {prefer!r}")
    by_lesson: dict[str, list[Run]] = {}
    for run in discover(root, repo, extra):
        by_lesson.setdefault(run.lesson, []).append(_load(run))
    for runs in by_lesson.values():
        runs.sort(key=lambda r: _key(r, prefer), reverse=True)
    return Results({k: v[0] for k, v in by_lesson.items()}, str(root), {k: v[1:] for k, v in by_lesson.items()})


def _key(run: Run, prefer: str):
    rank = {"gpu": {"gpu": 1, "cpu": 0}, "cpu": {"cpu": 1, "gpu": 0}, "newest": {"gpu": 0, "cpu": 0}}[prefer]
    # benchmarks/results runs win a tie of kind and date over extra files (they are lesson dicts as recorded)
    return rank[run.kind], run.date, run.label.startswith("benchmarks/")


class Reader:
    """What one claim's ``measure`` uses: read keys of recorded runs, or name a computation; both are logged."""

    def __init__(self, results: Results):
        self.results = results
        self.used: dict[str, list[str]] = {}  # source label -> key paths read there

    def run(self, lesson: str) -> Run:
        if lesson not in self.results:
            where = f" under {self.results.searched}" if self.results.searched else ""
            raise Missing(f"no recorded '{lesson}' run{where} (run python -m minipeft.lessons.{lesson} --json FILE)")
        return self.results[lesson]

    def timings(self, lesson: str) -> None:
        """Raise :class:`Missing` when ``lesson``'s run was made on a shared machine (its timings mean nothing)."""
        run = self.run(lesson)
        if run.shared:
            raise Missing(f"{run.label} was run while other runs shared the machine ({SHARED_MACHINE}): "
                          "its timings are not speed measurements")

    def has(self, lesson: str, *path) -> bool:
        try:
            self._walk(self.run(lesson), path)
            return True
        except Missing:
            return False

    def get(self, lesson: str, *path):
        """The value at ``path`` (keys, list indices) of ``lesson``'s run; logged as a source."""
        run = self.run(lesson)
        value = self._walk(run, path)
        keys = self.used.setdefault(run.label, [])
        dotted = ".".join(str(p) for p in path)
        if dotted not in keys:
            keys.append(dotted)
        return value

    def first(self, lesson: str, prefix: tuple, candidates, *rest):
        """The first of ``candidates`` present at ``prefix + (candidate,) + rest``: (candidate, value)."""
        for c in candidates:
            if self.has(lesson, *prefix, c, *rest):
                return c, self.get(lesson, *prefix, c, *rest)
        where = ".".join(str(p) for p in prefix) or "the top level"
        raise Missing(f"'{lesson}' run {self.run(lesson).label} has none of {list(candidates)} under {where}")

    def computed(self, what: str) -> None:
        """Log a computation with minipeft's own functions as a source ('minipeft.memory.estimate_memory')."""
        self.used.setdefault(what, [])

    def source(self) -> str:
        return "; ".join(f"{label}: {', '.join(keys)}" if keys else label for label, keys in self.used.items())

    @staticmethod
    def _walk(run: Run, path):
        node = run.data
        for i, p in enumerate(path):
            if isinstance(node, dict):
                key = p if p in node else str(p)
                if key not in node:
                    break
                node = node[key]
            elif isinstance(node, list) and isinstance(p, int) and -len(node) <= p < len(node):
                node = node[p]
            else:
                break
        else:
            return node
        dotted = ".".join(str(q) for q in path[: i + 1])
        raise Missing(f"{run.label} has no '{dotted}' (the lesson does not record it)")
