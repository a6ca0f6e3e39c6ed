"""minipeft.lessons.transfer_fits and transfer_runs: D_T read off scratch curves, the power-law fit, edge cases,
the run cache."""
import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft.lessons import transfer_fits, transfer_runs
from minipeft.gpt import GPT

K, ALPHA, BETA = 1.9e4, 0.18, 0.38  # the paper's text -> Python values, used as the truth here
NS = (1e3, 1e4, 1e5)
D_F = (1e2, 3e2, 1e3, 3e3, 1e4)
D_GRID = np.geomspace(1e2, 1e10, 17)


def _scratch_curve(N, l_inf=0.0):
    """A from-scratch loss-vs-data law, L(D) = l_inf + (D_c / D)^0.3, with D_c growing with N."""
    D_c = 1e11 / N**0.5
    return lambda D: l_inf + (D_c / np.asarray(D, dtype=float)) ** 0.3


def _synthetic(l_inf=0.0, grid=D_GRID):
    """(scratch {N: {D: L}}, fine-tuned {N: {D_F: L}}) with D_T = K D_F^ALPHA N^BETA exactly."""
    scratch, ft = {}, {}
    for N in NS:
        L = _scratch_curve(N, l_inf)
        scratch[N] = {float(d): float(L(d)) for d in grid}
        ft[N] = {d: float(L(d + K * d**ALPHA * N**BETA)) for d in D_F}
    return scratch, ft


def test_pure_power_law_recovers_D_T_and_the_fit_exactly():
    scratch, ft = _synthetic()
    rows = [(N, r) for N in NS for r in transfer_fits.effective_data_transferred(scratch[N], ft[N])]
    for N, r in rows:
        assert r["flag"] == "ok"
        assert r["D_T"] == pytest.approx(K * r["D_F"] ** ALPHA * N**BETA, rel=1e-9)
        assert r["multiplier"] == pytest.approx((r["D_F"] + r["D_T"]) / r["D_F"])
    fit = transfer_fits.fit_transfer([r["D_F"] for _, r in rows], [N for N, _ in rows], [r["D_T"] for _, r in rows])
    assert fit["k"] == pytest.approx(K, rel=1e-6)
    assert fit["alpha"] == pytest.approx(ALPHA, abs=1e-8)
    assert fit["beta"] == pytest.approx(BETA, abs=1e-8)
    assert fit["points"] == len(rows) and fit["rms_log10"] < 1e-8
    assert np.asarray(fit["covariance"]).shape == (3, 3)


def test_curve_with_an_irreducible_loss_recovers_the_fit_closely():
    """log L is not linear in log D any more: interpolation on a dense grid is still close."""
    scratch, ft = _synthetic(l_inf=1.0, grid=np.geomspace(1e2, 1e10, 65))
    rows = [(N, r) for N in NS for r in transfer_fits.effective_data_transferred(scratch[N], ft[N])]
    for N, r in rows:
        assert r["D_T"] == pytest.approx(K * r["D_F"] ** ALPHA * N**BETA, rel=0.03)
    fit = transfer_fits.fit_transfer([r["D_F"] for _, r in rows], [N for N, _ in rows], [r["D_T"] for _, r in rows])
    assert fit["alpha"] == pytest.approx(ALPHA, abs=0.01)
    assert fit["beta"] == pytest.approx(BETA, abs=0.01)
    assert fit["k"] == pytest.approx(K, rel=0.1)


def test_noisy_D_T_gives_uncertainties_that_cover_the_truth():
    rng = np.random.default_rng(0)
    df, n = np.meshgrid(np.geomspace(1e2, 1e5, 8), NS)
    dt = K * df**ALPHA * n**BETA * np.exp(rng.normal(0, 0.1, df.shape))
    fit = transfer_fits.fit_transfer(df.ravel(), n.ravel(), dt.ravel())
    assert 0 < fit["alpha_err"] < 0.05 and 0 < fit["beta_err"] < 0.05
    assert abs(fit["alpha"] - ALPHA) < 4 * fit["alpha_err"]
    assert abs(fit["beta"] - BETA) < 4 * fit["beta_err"]
    assert abs(fit["log10_k"] - math.log10(K)) < 4 * fit["log10_k_err"]


def test_fit_with_one_size_fits_alpha_only_and_too_few_points_give_nan():
    fit = transfer_fits.fit_transfer([1e2, 1e3, 1e4], [5e3] * 3, [K * d**ALPHA for d in (1e2, 1e3, 1e4)])
    assert fit["alpha"] == pytest.approx(ALPHA) and math.isnan(fit["beta"])
    exact = transfer_fits.fit_transfer([1e2, 1e3, 1e2], [1e3, 1e3, 1e4], [10.0, 20.0, 30.0])  # 3 points, 3 parameters
    assert math.isfinite(exact["alpha"]) and math.isnan(exact["alpha_err"])  # no spare degree of freedom
    assert math.isnan(transfer_fits.fit_transfer([1e3], [1e3], [1e4])["alpha"])
    assert math.isnan(transfer_fits.fit_transfer([], [], [])["k"])
    with pytest.raises(ValueError, match="positive"):
        transfer_fits.fit_transfer([1e3, 1e4, 1e5], [1e3, 1e4, 1e5], [1.0, -5.0, 3.0])


# ---- inverting a scratch curve -------------------------------------------------------------------
D = [1e3, 1e4, 1e5, 1e6]
L = [3.0, 2.5, 2.2, 2.0]


def test_inversion_at_grid_points_and_between():
    for d, l in zip(D, L):
        assert transfer_fits.data_for_loss(D, L, l) == (pytest.approx(d), "ok")
    d, flag = transfer_fits.data_for_loss(D, L, 2.35)
    assert flag == "ok" and 1e4 < d < 1e5
    # linear in (log D, log L) between the neighbours
    t = (math.log(2.5) - math.log(2.35)) / (math.log(2.5) - math.log(2.2))
    assert d == pytest.approx(10 ** (4 + t))


def test_inversion_outside_the_curve_is_flagged():
    assert transfer_fits.data_for_loss(D, L, 1.5) == (1e6, "above_range")  # better than every scratch run: lower bound
    assert transfer_fits.data_for_loss(D, L, 3.5) == (1e3, "below_range")  # worse than the smallest scratch run


def test_inversion_of_a_non_monotone_curve_uses_its_isotonic_envelope():
    noisy = [3.0, 2.5, 2.6, 2.0]  # D = 1e5 came out worse than D = 1e4: pooled (in log L) to a plateau
    pooled = math.sqrt(2.5 * 2.6)
    assert transfer_fits.data_for_loss(D, noisy, pooled) == (pytest.approx(1e4), "ok")  # a plateau: its smallest D
    d, _ = transfer_fits.data_for_loss(D, noisy, 2.3)
    assert 1e5 < d < 1e6


def test_negative_D_T_when_fine_tuning_ends_worse_than_scratch():
    rows = transfer_fits.effective_data_transferred(dict(zip(D, L)), {1e5: 2.4, 1e3: 2.9})
    assert [r["D_F"] for r in rows] == [1e3, 1e5]  # sorted by D_F
    assert rows[0]["flag"] == "ok" and rows[0]["D_T"] > 0
    assert rows[1]["flag"] == "negative" and rows[1]["D_T"] < 0 and rows[1]["multiplier"] < 1


@pytest.mark.parametrize("args, match", [
    (([1e3], [3.0], 3.0), "length"),
    (([1e3, 1e4], [3.0], 3.0), "length"),
    (([1e4, 1e3], [3.0, 2.0], 2.5), "increasing"),
    (([1e3, 1e4], [3.0, -2.0], 2.5), "positive"),
    (([1e3, 1e4], [3.0, 2.0], float("nan")), "target"),
])
def test_inversion_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        transfer_fits.data_for_loss(*args)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.5, 5.0), min_size=1, max_size=12))
def test_isotonic_envelope_is_non_increasing_and_keeps_the_mean(y):
    e = transfer_fits.isotonic_decreasing(y)
    assert e.shape == (len(y),)
    assert np.all(np.diff(e) <= 1e-12)
    assert e.mean() == pytest.approx(np.mean(y))
    if np.all(np.diff(y) <= 0):
        np.testing.assert_allclose(e, y)


def test_saturation_data():
    # within 1% of the best from 1e4 on
    assert transfer_fits.saturation_data(D, [3.0, 2.0, 1.995, 1.99]) == (1e4, False)
    assert transfer_fits.saturation_data(D, L) == (1e6, True)  # still falling: a lower bound


def test_analyze_on_synthetic_runs():
    scratch, ft = _synthetic()
    recs = []
    for N in NS:
        size = f"n{int(N)}"
        recs += [{"kind": "scratch", "size": size, "N": N, "D": d, "loss": l, "source": None}
                 for d, l in scratch[N].items()]
        recs += [{"kind": "finetune", "size": size, "N": N, "D": d, "loss": l, "source": "english"}
                 for d, l in ft[N].items()]
    # an ossified point for the smallest model at a large D_F: fine-tuned worse than scratch there
    recs.append({"kind": "finetune", "size": "n1000", "N": 1e3, "D": 1e10, "loss": scratch[1e3][1e10] + 0.1,
                 "source": "english"})
    a = transfer_fits.analyze(recs, low_data_fraction=1.0)
    assert list(a["sizes"]) == ["n1000", "n10000", "n100000"]
    f = a["fits"]["english"]
    assert f["alpha"] == pytest.approx(ALPHA, abs=1e-6) and f["beta"] == pytest.approx(BETA, abs=1e-6)
    assert f["paper"] == transfer_fits.PAPER_FITS["english"]
    oss = a["ossification"][0]
    assert oss["size"] == "n1000" and oss["D_F"] == 1e10 and oss["ossified"] == {"english": True}
    assert [p for p in a["points"] if p["D_F"] == 1e10][0]["flag"] == "negative"


# ---- sizes, specs, the cache ---------------------------------------------------------------------
@pytest.mark.parametrize("size", ["L1d8", "L1d16", "L1d32", "L2d32", "T0", "T1"])
def test_non_embedding_params_matches_the_model(size):
    model = GPT(transfer_runs.model_config(size, transfer_runs.TransferConfig()))
    assert transfer_runs.non_embedding_params(size) == model.num_parameters(non_embedding=True)


def test_grids_span_what_the_course_asks():
    for name in ("cpu", "gpu"):
        g = transfer_runs.GRIDS[name]
        n = [transfer_runs.non_embedding_params(s) for s in g.sizes]
        assert max(n) / min(n) >= 100, name
        assert max(g.finetune_D) / min(g.finetune_D) >= 1000, name
        assert set(g.finetune_D) <= set(g.scratch_D), name
        for s in g.sizes:
            assert g.config_for(s).max_steps >= 1


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="unknown sizes"):
        transfer_runs.TransferGrid(("nope",), (1000,), (1000,))
    with pytest.raises(ValueError, match="block_size"):
        transfer_runs.TransferGrid(("L1d8",), (10,), (1000,))
    with pytest.raises(ValueError, match="unknown sources"):
        transfer_runs.TransferGrid(("L1d8",), (1000,), (1000,), sources=("klingon",))
    with pytest.raises(ValueError, match="positive int"):
        transfer_runs.TransferConfig(max_steps=0)
    with pytest.raises(ValueError, match="needs a source"):
        transfer_runs.run_spec("finetune", "L1d8", 1000, None, transfer_runs.TransferConfig())
    with pytest.raises(ValueError, match="kind"):
        transfer_runs.run_spec("distill", "L1d8", 1000, None, transfer_runs.TransferConfig())
    with pytest.raises(ValueError, match="Python training split"):
        transfer_runs.python_train(10**12)


def test_cache_key_holds_every_setting_that_matters():
    c = transfer_runs.TransferConfig()
    key = lambda *a: transfer_runs.run_path(transfer_runs.run_spec(*a), "/c")  # noqa: E731
    assert key("scratch", "L1d8", 1000, None, c) == key("scratch", "L1d8", 1000, None, c)
    assert key("scratch", "L1d8", 1000, None, c) != key("scratch", "L1d8", 3000, None, c)
    assert key("scratch", "L1d8", 1000, None, c) != key("scratch", "L1d8", 1000, None, dataclasses.replace(c, seed=1))
    # pretraining and fine-tuning settings do not touch a scratch run, but do a fine-tuning run
    other = dataclasses.replace(c, pretrain_steps=7, finetune_lr_scale=0.5)
    assert key("scratch", "L1d8", 1000, None, c) == key("scratch", "L1d8", 1000, None, other)
    assert key("finetune", "L1d8", 1000, "english", c) != key("finetune", "L1d8", 1000, "english", other)
    assert key("finetune", "L1d8", 1000, "english", c) != key("finetune", "L1d8", 1000, "english+c", c)


TINY = transfer_runs.TransferConfig(block_size=16, batch_size=4, max_steps=4, warmup_steps=1, eval_every=2, patience=1,
                        val_bytes=256, test_bytes=256, pretrain_steps=3, pretrain_batch_size=4)


def test_runs_are_cached_and_not_redone(tmp_path, monkeypatch):
    first = transfer_runs.run("scratch", "L1d8", 2000, None, TINY, cache=tmp_path)
    assert first["cached"] is False and math.isfinite(first["loss"]) and first["steps"] <= TINY.max_steps
    assert first["N"] == transfer_runs.non_embedding_params("L1d8")
    assert len(list((tmp_path / "runs").glob("*.json"))) == 1

    def no_training(*a, **k):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(transfer_runs, "train_to_best", no_training)
    again = transfer_runs.run("scratch", "L1d8", 2000, None, TINY, cache=tmp_path)
    assert again["cached"] is True and again["loss"] == first["loss"]
    with pytest.raises(AssertionError, match="trained again"):
        transfer_runs.run("scratch", "L1d8", 3000, None, TINY, cache=tmp_path)


def test_base_model_is_pretrained_once_and_reused(tmp_path):
    a = transfer_runs.run("finetune", "L1d8", 2000, "english", TINY, cache=tmp_path)
    b = transfer_runs.run("finetune", "L1d8", 3000, "english", TINY, cache=tmp_path)
    assert not a["cached"] and not b["cached"]
    bases = list((tmp_path / "bases").iterdir())
    assert len(bases) == 1 and (bases[0] / "model.safetensors").is_file()
    model, meta = transfer_runs.load_base("L1d8", "english", TINY, cache=tmp_path)
    assert meta["source"] == "english" and math.isfinite(meta["python_test_loss_zero_shot"])
    assert model.num_parameters(non_embedding=True) == transfer_runs.non_embedding_params("L1d8")


def test_run_grid_budget_leaves_runs_for_the_next_call(tmp_path):
    grid = transfer_runs.TransferGrid(("L1d8",), (2000, 3000), (2000,), sources=("english",), config=TINY)
    done = transfer_runs.run("scratch", "L1d8", 2000, None, TINY, cache=tmp_path)
    results, left = transfer_runs.run_grid(grid, cache=tmp_path, budget_s=0.0, log=None)
    assert [r["D"] for r in results] == [2000] and results[0]["loss"] == done["loss"] and left == 2
    results, left = transfer_runs.run_grid(grid, cache=tmp_path, log=None)
    assert len(results) == 3 and left == 0


def test_run_grid_in_parallel_workers_gives_the_serial_results(tmp_path):
    grid = transfer_runs.TransferGrid(("L1d8",), (2000, 3000), (2000,), sources=("english",), config=TINY)
    serial, left = transfer_runs.run_grid(grid, cache=tmp_path / "serial", log=None)
    assert left == 0
    lines = []
    parallel, left = transfer_runs.run_grid(grid, cache=tmp_path / "parallel", log=lines.append, jobs=2)
    assert left == 0 and len(parallel) == len(serial) == 3
    for a, b in zip(serial, parallel):
        assert (a["kind"], a["D"], a["source"]) == (b["kind"], b["D"], b["source"])
        assert a["loss"] == b["loss"] and a["best_step"] == b["best_step"]
    assert any("base L1d8 on english" in line for line in lines) and sum("finetune" in x for x in lines) == 1
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        transfer_runs.run_grid(grid, cache=tmp_path / "serial", log=None, jobs=0)
