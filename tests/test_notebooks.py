"""Execute every course notebook (notebooks/*.ipynb) in quick mode, as CI does.

Each notebook reads ``MINIPEFT_QUICK=1`` and passes ``--quick`` to its lesson, so the
whole story runs in seconds; a cell that raises fails the test.

A lesson executes once per session: where its test (``tests/lessons``, collected first) has
run it, the notebook's call ``<lesson>.main(ARGS)`` replays that run (``tests/lessons/recorded.py``):
the call must ask for the same run, and the cells after it read its real result and figures.
"""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

nbformat = pytest.importorskip("nbformat", reason="install the dev extra: pip install -e '.[dev]'")
nbclient = pytest.importorskip("nbclient", reason="install the dev extra: pip install -e '.[dev]'")

from .lessons import recorded  # noqa: E402


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ should hold the course notebooks"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIPEFT_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("MINIPEFT_FIGURES", str(tmp_path / "figures"))
    nb = nbformat.read(path, as_version=4)
    lesson = path.stem.split("_", 1)[1]  # 03_lora -> minipeft.lessons.lora
    marker = tmp_path / "replayed"
    replayed = lesson in recorded.RUNS
    if replayed:  # after the setup cell (which defines ARGS), before the lesson's call
        nb.cells.insert(2, nbformat.v4.new_code_cell(recorded.replay_source(lesson, marker)))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    if replayed:
        assert marker.is_file(), f"{path.name} never called minipeft.lessons.{lesson}.main"
