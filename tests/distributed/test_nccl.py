"""The NCCL backend on a GPU machine: one rank (or as many as there are GPUs) started by the launcher."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kind", ["full", "qlora"])
def test_nccl_ranks_run_every_stage(tmp_path, kind):
    import cupy

    n = min(2, cupy.cuda.runtime.getDeviceCount())
    out = tmp_path / "out.json"
    env = dict(os.environ, MINIPEFT_DEVICE="cuda")
    proc = subprocess.run([sys.executable, "-m", "minipeft.launch", "--nproc", str(n), "--backend", "nccl", "-m",
                           "minipeft.lessons.zero", "--quick", "--device", "cuda", "--kind", kind, "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["backend"] == "nccl" and res["world_size"] == n
    assert res["memory_equal"], res["per_rank"]
    assert res["stages_max_rel_diff"] < 1e-5  # NCCL's ring order and GPU atomics: equal within rounding
    assert res["one_process_max_rel_diff"] < 1e-5
    assert np.isfinite(res["losses"]).all()
