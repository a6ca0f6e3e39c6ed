"""The transfer lesson in quick mode: it runs, fits finite k, alpha, beta, and redraws from its data.

One run of ``main(["--quick"])`` (seconds, its own run cache) is shared by the checks below.
"""
import json
import math

import pytest

from minipeft.lessons import transfer
from . import recorded

FIGURES = ("transfer_loss_vs_data", "transfer_dt_vs_df", "transfer_multiplier")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer")
    argv = ["--quick", "--cache", str(out / "cache"), "--figures", str(out / "figures"),
            "--json", str(out / "transfer.json")]
    return recorded.run(transfer, argv) | {"_out": out, "_argv": argv}


def test_quick_mode_fits_finite_values(result):
    assert result["grid"] == "quick"
    for key in ("k", "alpha", "beta"):
        assert math.isfinite(result[key]) and result[key] == result["fits"]["english"][key]
    assert result["k"] > 0
    assert set(result["fits"]) == {"english", "english+c"}
    assert result["runs"] == 20 and result["runs_left"] == 0


def test_points_ossification_and_targets_are_reported(result):
    assert {p["source"] for p in result["points"]} == {"english", "english+c"}
    assert all(p["flag"] in ("ok", "negative", "above_range", "below_range") for p in result["points"])
    assert [o["size"] for o in result["ossification"]] == ["L1d8", "L1d16"]
    assert all(isinstance(v, bool) for v in result["targets"].values())


def test_figures_and_their_data_are_written(result):
    fig = result["_out"] / "figures"
    for name in FIGURES:
        assert (fig / f"{name}.png").is_file()
    data = json.loads((fig / "transfer_data.json").read_text())
    assert data["command"].startswith("python -m minipeft.lessons.transfer --quick")
    assert data["analysis"]["fits"]["english"]["alpha"] == pytest.approx(result["alpha"])
    assert (result["_out"] / "transfer.json").is_file()


def test_rerun_reads_every_run_from_the_cache(result):
    again = transfer.main(result["_argv"])
    assert again["alpha"] == result["alpha"] and again["runs"] == result["runs"]


def test_replot_redraws_from_the_saved_data(result, tmp_path):
    data = result["_out"] / "figures" / "transfer_data.json"
    out = transfer.main(["--replot", str(data), "--figures", str(tmp_path)])
    assert out["alpha"] == pytest.approx(result["alpha"]) and out["beta"] == pytest.approx(result["beta"])
    for name in FIGURES:
        assert (tmp_path / f"{name}.png").is_file()
