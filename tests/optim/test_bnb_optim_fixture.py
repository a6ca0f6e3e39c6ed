"""minipeft's 8-bit and Lion optimizers against bitsandbytes' own, step by step.

The fixture ``tests/fixtures/bnb_optim.safetensors`` (+ ``bnb_optim.json``) was recorded by
``tests/fixtures/make_bnb_optim_fixtures.py`` with bitsandbytes 0.50.2's CUDA kernels on an
H200 (its docstring lists cases and keys). For every case and step t, minipeft's optimizer is
loaded with bitsandbytes' parameter and state after step t-1 (t = 1: p0 and zero state),
takes one step with bitsandbytes' gradient g_t, and is compared with bitsandbytes after step t:

* absmax: bit for bit. The state update follows the kernel in float32 with float32
  hyperparameters and the fused multiply-adds ``--use_fast_math`` makes (``state8bit.fma32``);
  without them 5-80 of 85 absmax per case differ in the last bits (measured).
* state codes (uint8): equal. A code may only differ where the float32 state sits within
  rounding of a decision boundary; we allow at most ``MAX_TIES`` such codes per tensor and
  step, and only between neighbouring codes (measured: none, in every case and step).
* Lion and Lion8bit parameters, Lion's float32 state: bit for bit.
* AdamW8bit parameters: within one float32 ulp of bitsandbytes' plus ``ADAM_STEP_RTOL`` of
  the step |p_t - p_{t-1}|. The kernel computes the bias corrections 1 - b^t with
  ``__powf`` (an approximate exp2(t*log2 b)): the step is off by 3.0e-5 of itself at t = 1,
  1.8e-5 at t = 5 (measured), which no exact arithmetic reproduces.

``test_chained_run`` runs the 5 steps from p0 on minipeft's own state: the states of Adam
and Lion do not depend on the parameters, so they stay bit for bit; AdamW8bit's parameters
drift by at most the per-step tolerances summed, Lion's stay bit for bit.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from minipeft.backend import to_numpy
from minipeft.nn import Parameter
from minipeft.optim import AdamW8bit, Lion, Lion8bit, PagedAdamW8bit

HERE = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURE, META = HERE / "bnb_optim.safetensors", HERE / "bnb_optim.json"
PRESENT = FIXTURE.exists() and META.exists()
REASON = (f"{FIXTURE.name} not found in tests/fixtures/: make it on a CUDA machine with torch and "
          "bitsandbytes==0.50.2 by running `python tests/fixtures/make_bnb_optim_fixtures.py`")
META_JSON = json.loads(META.read_text()) if PRESENT else {"cases": {}, "steps": 0}
CASES = sorted(META_JSON["cases"])
STEPS = META_JSON["steps"]
CLASSES = {"AdamW8bit": AdamW8bit, "PagedAdamW8bit": PagedAdamW8bit, "Lion8bit": Lion8bit, "Lion": Lion}
MAX_TIES = 1          # codes allowed to differ per tensor and step (neighbours only); measured 0
ADAM_STEP_RTOL = 4e-5  # of |p_t - p_{t-1}|: bitsandbytes' __powf bias corrections (measured <= 3.0e-5)


@pytest.fixture(scope="module")
def fx():
    if not PRESENT:
        pytest.skip(REASON)
    from safetensors.numpy import load_file
    return load_file(str(FIXTURE))


def make(case, p, **extra):
    meta = META_JSON["cases"][case]
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["kwargs"].items()}
    cls = CLASSES[meta["optimizer"]]
    if cls is PagedAdamW8bit:
        extra.setdefault("page_size", 1024)                             # 5 pages, 2 on the device
        extra.setdefault("device_budget_bytes", 2 * (2 * 1024 + 8 * 1024 // 256))
    return cls([p], **kwargs, **extra)


def state_keys(case):
    return [k for k in META_JSON["cases"][case]["state_keys"] if not k.startswith("qmap")]


def bnb_state_dict(opt, fx, case, t):
    """bitsandbytes' state after step t as a minipeft state dict (t = 0: no state yet)."""
    state = {} if t == 0 else {"0": {"step": t, **{k: fx[f"{case}.t{t}.{k}"] for k in state_keys(case)}}}
    return {"type": type(opt).__name__, "hparams": opt.hparams(), "param_names": ["0"], "state": state}


def bits(a):
    a = np.ascontiguousarray(to_numpy(a))
    return a.view({1: np.uint8, 4: np.uint32}[a.dtype.itemsize])


def check_state(opt, fx, case, t, where):
    ours = opt.state_dict()["state"]["0"]
    for k in state_keys(case):
        ref, got = fx[f"{case}.t{t}.{k}"], to_numpy(ours[k])
        assert got.shape == ref.shape and got.dtype == ref.dtype, f"{where} {k}: {got.dtype}{got.shape}"
        diff = np.nonzero(bits(got).reshape(-1) != bits(ref).reshape(-1))[0]
        if ref.dtype == np.uint8:                                       # codes: ties only
            steps = np.abs(got.reshape(-1)[diff].astype(int) - ref.reshape(-1)[diff].astype(int))
            assert diff.size <= MAX_TIES and (steps == 1).all(), \
                f"{where} {k}: {diff.size} codes differ at {diff[:8].tolist()} by {steps[:8].tolist()}"
        else:                                                           # absmax, float32 state
            assert diff.size == 0, (f"{where} {k}: {diff.size} of {ref.size} differ, first at "
                                    f"{diff[:8].tolist()}: ours {got.reshape(-1)[diff[:8]].tolist()} vs "
                                    f"bitsandbytes {ref.reshape(-1)[diff[:8]].tolist()}")


def adam_tolerance(ref, prev):
    """One step's: an ulp of p_t plus ADAM_STEP_RTOL of bitsandbytes' step p_t - p_{t-1}."""
    return np.spacing(np.abs(ref)).astype(np.float64) + ADAM_STEP_RTOL * np.abs(ref.astype(np.float64) - prev)


def check_param(case, got, ref, prev, where, tol=None):
    got = to_numpy(got)
    if "Adam" in META_JSON["cases"][case]["optimizer"]:
        err = np.abs(got.astype(np.float64) - ref)
        tol = adam_tolerance(ref, prev) if tol is None else tol
        assert (err <= tol).all(), f"{where}: max |dp| {err.max():.3g}, worst excess {(err - tol).max():.3g}"
    else:
        np.testing.assert_array_equal(bits(got), bits(ref), err_msg=f"{where}: Lion parameters differ")


def test_fixture_present():
    if not PRESENT:
        pytest.skip(REASON)
    assert META_JSON["bitsandbytes"].startswith("0.50") and STEPS == 5
    assert {c.split(".")[0] for c in CASES} == {"adamw8bit", "adamw8bit_nowd", "paged_adamw8bit",
                                                "lion8bit", "lion"}


@pytest.mark.parametrize("case", CASES)
def test_each_step_from_bitsandbytes_state(xp, fx, case):
    for t in range(1, STEPS + 1):
        prev = fx[f"{case}.t{t - 1}.p"] if t > 1 else fx[f"{case}.p0"]
        p = Parameter(xp.array(prev))
        opt = make(case, p)
        opt.load_state_dict(bnb_state_dict(opt, fx, case, t - 1))
        p.grad = xp.array(fx[f"{case}.g{t}"])
        opt.step()
        assert opt.state["0"]["step"] == t
        check_state(opt, fx, case, t, f"{case} step {t}")
        check_param(case, p.data, fx[f"{case}.t{t}.p"], prev, f"{case} step {t}")


@pytest.mark.parametrize("case", CASES)
def test_chained_run(xp, fx, case):
    p0 = fx[f"{case}.p0"]
    p = Parameter(xp.array(p0))
    opt = make(case, p)
    if isinstance(opt, (AdamW8bit, Lion8bit, PagedAdamW8bit)):
        assert opt.is_8bit(p)                                           # 4096 and 4224 elements
    tol, prev = 0.0, p0
    for t in range(1, STEPS + 1):
        p.grad = xp.array(fx[f"{case}.g{t}"])
        opt.step()
        check_state(opt, fx, case, t, f"{case} chained step {t}")
        ref = fx[f"{case}.t{t}.p"]
        tol, prev = tol + adam_tolerance(ref, prev), ref                # the per-step bounds, summed
        check_param(case, p.data, ref, prev, f"{case} chained step {t}", tol)


def test_paged_case_pages(fx):
    """The paged case really moves pages and equals unpaged AdamW8bit bit for bit."""
    case = "paged_adamw8bit.33x128"
    if case not in CASES:
        pytest.skip(f"{case} not in the fixture")
    a, b = Parameter(fx[f"{case}.p0"].copy()), Parameter(fx[f"{case}.p0"].copy())
    paged, plain = make(case, a), AdamW8bit([b], **META_JSON["cases"][case]["kwargs"])
    for t in range(1, STEPS + 1):
        a.grad, b.grad = fx[f"{case}.g{t}"], fx[f"{case}.g{t}"].copy()
        paged.step()
        plain.step()
    np.testing.assert_array_equal(bits(a.data), bits(b.data))
    stats = paged.paging_stats()
    assert stats["pages"] == 5 and stats["page_outs"] > 0 and stats["peak_device_bytes"] <= 2 * 2080
