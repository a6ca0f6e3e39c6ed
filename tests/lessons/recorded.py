"""Each lesson executes once per test session: its test runs it, its notebook replays that run.

A lesson's test calls ``run(module, argv)`` instead of ``module.main(argv)``: the lesson runs
(in this process, where the test can watch it), and the run is recorded: its arguments, its
JSON result and its figures. ``tests/test_notebooks.py`` then executes the notebook with the
lesson's ``main`` replaced by ``replay_source(...)``: the notebook's own call is checked to ask
for the same run (the same flags, output paths aside) and gets the recorded result and figures
back, so every other cell of the notebook runs on the real numbers without training again.
A notebook whose lesson did not run in this session (its test was deselected) runs it itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# flags that only say where a run writes (or caches) its files: a replay may differ in them
OUTPUT_FLAGS = ("--figures", "--json", "--save", "--cache")


@dataclass(frozen=True)
class Run:
    argv: tuple  # the lesson's arguments
    json: Path  # the result main wrote (``--json``)
    figures: Path  # the figures main wrote (``--figures``)


RUNS: dict[str, Run] = {}  # lesson module name ('lora') -> its run in this session


def _value(argv, flag: str) -> Path:
    if flag not in argv:
        raise ValueError(f"a recorded lesson run needs {flag} in its arguments, got {list(argv)}")
    return Path(argv[argv.index(flag) + 1])


def run(module, argv: list) -> dict:
    """``module.main(argv)``, recorded for the notebook test (``argv`` must give --json and --figures)."""
    name = module.__name__.rsplit(".", 1)[-1]
    rec = Run(tuple(argv), _value(argv, "--json"), _value(argv, "--figures"))
    result = module.main(list(argv))
    RUNS[name] = rec
    return result


def replay_source(name: str, marker: Path) -> str:
    """Code of a notebook cell that makes ``minipeft.lessons.<name>.main`` replay the recorded run.

    The replay fails (and with it the notebook) when the notebook asks for another run than the
    recorded one; it writes ``marker`` so the test can check the notebook called its lesson.
    """
    rec = RUNS[name]
    return f"""\
import json as _json, shutil as _shutil
from pathlib import Path as _Path
import minipeft.lessons.{name} as _lesson

def _settings(argv, output_flags={OUTPUT_FLAGS!r}):  # argv without output paths
    return [a for i, a in enumerate(argv) if a not in output_flags and (i == 0 or argv[i - 1] not in output_flags)]

def _replay(argv):
    asked, recorded = _settings(list(argv)), _settings({list(rec.argv)!r})
    assert asked == recorded, f"the notebook asks for {{asked}}, the lesson test ran {{recorded}}"
    figures = _Path(argv[argv.index("--figures") + 1])
    _shutil.copytree({str(rec.figures)!r}, figures, dirs_exist_ok=True)
    _Path({str(marker)!r}).write_text(" ".join(argv))
    return _json.loads(_Path({str(rec.json)!r}).read_text())

_lesson.main = _replay"""
