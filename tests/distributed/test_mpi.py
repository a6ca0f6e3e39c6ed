"""Data parallelism and ZeRO on 2 and 4 MPI ranks started by the launcher (CPU, mpi4py + mpich).

Each launch runs the zero lesson in quick mode, which trains a tiny GPT at stages 0-3 on every
rank and returns, from rank 0: the per-rank bytes measured and predicted, whether every stage
equals plain DP bit for bit, and whether DP equals one process over the same shards.
"""
import json
import os
import subprocess
import sys

import pytest

from minipeft.checkpoint import list_checkpoints, remove_checkpoint
from minipeft.distributed import DataParallel, World
from minipeft.launch import find_mpiexec
from minipeft.lessons.zero import QUICK, run_case

from .. import crosscheck  # noqa: E402

pytest.importorskip("mpi4py")  # pip install -r .ci/distributed.txt (mpi4py and mpich); CI fails instead of skipping
if find_mpiexec() is None:
    if crosscheck.required():
        pytest.fail("no mpiexec: pip install -r .ci/distributed.txt (mpich)", pytrace=False)
    pytest.skip("no mpiexec (pip install mpich)", allow_module_level=True)


def launch(tmp_path, nproc, *args, name="out.json"):
    out = tmp_path / name
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "minipeft.launch", "--nproc", str(nproc), "-m",
                           "minipeft.lessons.zero", "--quick", "--json", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.parametrize("kind,optimizer,dropout", [("full", "adamw", "0"), ("lora", "adamw8bit", "0.1"),
                                                    ("qlora", "paged_adamw", "0")])
def test_two_ranks_equal_one_process_and_the_calculator(tmp_path, kind, optimizer, dropout):
    """Exact: with dropout too, each shard draws its masks from its own stream, whichever rank runs it.

    The stage-2 run writes a checkpoint every step (rank 0 alone, with the optimizer state gathered
    from both ranks); one process resumes from the one before the last and takes the last step again.
    """
    ck = tmp_path / "ck"
    res, out = launch(tmp_path, 2, "--kind", kind, "--optimizer", optimizer, "--dropout", dropout,
                      "--checkpoint-dir", str(ck))
    assert res["world_size"] == 2 and res["backend"] == "mpi"
    assert res["equal_one_process"], (res["losses"], res["one_process_losses"])
    assert res["stages_equal_dp"]
    assert res["memory_equal"], res["per_rank"]
    per = res["per_rank"]
    w0, g0, o0 = per["0"][0][0]  # stage 0, rank 0, measured
    assert per["1"][0][0][2] < o0 and per["2"][0][0][1] < g0 and per["3"][0][0][0] < w0  # each stage sheds its part
    assert "stage 3 P_os+g+p" in out and "meas/pred" in out
    launched = res["bucket_launches_per_step"]  # the lesson's small buckets start while backward runs
    several = 2 if kind == "full" else 1  # LoRA's few trainable bytes fill one bucket
    assert all(launched[s]["during backward"] >= several and launched[s]["after backward"] == 0 for s in "0123")

    assert [s for s, _ in list_checkpoints(ck)] == list(range(1, QUICK["steps"] + 1))
    remove_checkpoint(list_checkpoints(ck)[-1][1])
    again = run_case(kind, optimizer, DataParallel(World(), num_shards=2), QUICK, checkpoint_dir=str(ck),
                     resume=True, dropout=float(dropout))
    assert again["losses"] == res["losses"]  # bit for bit, with another world size


@pytest.mark.slow
def test_four_ranks(tmp_path):
    res, _ = launch(tmp_path, 4, "--kind", "lora")
    assert res["world_size"] == 4 and res["equal_one_process"] and res["stages_equal_dp"] and res["memory_equal"]


def test_train_turns_data_parallel_by_itself(tmp_path):
    """A module that calls train() as usual, started on 2 ranks: DP without asking, rank 0 alone logs."""
    from pathlib import Path

    from tests.distributed._auto_worker import run

    out = tmp_path / "auto.json"
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "minipeft.launch", "--nproc", "2", "-m",
                           "tests.distributed._auto_worker", str(out)], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world_size"] == 2
    assert res["losses"] == run(DataParallel(World(), num_shards=2))  # dropout 0.1 included
    assert proc.stdout.count("step      1 |") == 1  # the log line comes from rank 0 only


@pytest.mark.parametrize("nproc", [2, 4])
def test_overlap_with_backward_changes_no_bit(tmp_path, nproc):
    """Buckets started from gradient hooks during backward give the losses and weights of buckets started
    after it, bit for bit, for full/LoRA/QLoRA at stages 0-3; a rank whose shard leaves a parameter without
    gradient starts that bucket (and the later ones) after backward, and the ranks still pair their collectives."""
    from pathlib import Path

    out = tmp_path / "overlap.json"
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "minipeft.launch", "--nproc", str(nproc), "-m",
                           "tests.distributed._overlap_worker", str(out)], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world_size"] == nproc and len(res["equal"]) == 12
    assert all(res["equal"].values()), res["equal"]
    assert all(on > 3 and off == 0 for on, off in res["during"].values()), res["during"]
    for stage, got in res["uneven"].items():
        assert got["right"] and got["during"] == [3] + [1] * (nproc - 1), (stage, got)
