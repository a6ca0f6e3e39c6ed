"""The parts of minipeft.distributed that need no second rank: partition, buckets, shards,
the ZeRO arithmetic, errors, and train() with a one-process DataParallel."""
import os
import subprocess
import sys

import numpy as np
import pytest

from minipeft import distributed
from minipeft.distributed import DataParallel, World, make_buckets, partition
from minipeft.distributed import world as world_mod
from minipeft.engine import Tensor
from minipeft.launch import main as launch_main
from minipeft.lessons.zero import QUICK, run_case
from minipeft.memory_zero import (PAPER_FIG1, communication_elements, devices_needed, optimizer_state_bytes,
                                  per_rank_bytes, zero_model_states)


def test_partition_is_balanced_and_deterministic():
    sizes = [("a", 100), ("b", 60), ("c", 50), ("d", 10)]
    owner = partition(sizes, 2)
    assert owner == {"a": 0, "b": 1, "c": 1, "d": 0}  # largest first to the lighter rank
    assert partition(sizes, 2) == owner and set(partition(sizes, 3).values()) == {0, 1, 2}
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        partition(sizes, 0)


def test_buckets_respect_size_dtype_and_owner():
    params = [(n, Tensor(np.zeros(k, np.float32), requires_grad=True)) for n, k in
              (("a", 10), ("b", 10), ("c", 30), ("d", 5))]
    buckets = make_buckets(params, None, bucket_bytes=80)  # 20 float32 per bucket
    assert [[n for n, _ in b.members] for b in buckets] == [["a", "b"], ["c"], ["d"]]
    owned = make_buckets(params, {"a": 0, "b": 1, "c": 0, "d": 1}, bucket_bytes=10**6)
    assert [([n for n, _ in b.members], b.owner) for b in owned] == [(["a", "c"], 0), (["b", "d"], 1)]
    with pytest.raises(ValueError, match="bucket_bytes must be >= 1"):
        make_buckets(params, None, 0)


def test_shards_and_their_errors():
    x = np.arange(8 * 3).reshape(8, 3)
    shards = list(DataParallel(World(), num_shards=4).local_shards((x, x + 1)))
    assert len(shards) == 4 and np.array_equal(np.concatenate([s[0] for s in shards]), x)
    assert np.array_equal(shards[1][1], x[2:4] + 1)
    with pytest.raises(ValueError, match="cannot be split evenly into 3 shards"):
        DataParallel(World(), num_shards=3).local_shards((x, x))
    with pytest.raises(ValueError, match="ZeRO stage must be one of"):
        DataParallel(World(), stage=4)
    with pytest.raises(ValueError, match="must be a positive multiple of the world size"):
        DataParallel(World(), num_shards=0)


def test_paper_figure_1_and_communication():
    got = {s: zero_model_states(PAPER_FIG1["psi"], PAPER_FIG1["n_d"], s)["total"] / 1e9 for s in range(4)}
    for s, gb in PAPER_FIG1["gb"].items():
        assert got[s] == pytest.approx(gb, abs=0.05)
    assert communication_elements(1000, 0) == communication_elements(1000, 2) == 2000
    assert communication_elements(1000, 3) == 3000
    assert devices_needed(175e9, 3, 40e9) == 70 and devices_needed(175e9, 0, 40e9) is None
    with pytest.raises(ValueError, match="ZeRO stage must be one of"):
        zero_model_states(1, 1, 5)


def test_per_rank_prediction_follows_the_partition():
    sizes = {"a": 5000, "b": 100}
    owner = {"a": 0, "b": 1}
    assert per_rank_bytes(sizes, owner, 1, 0) == {"weights": 20400, "gradients": 20400, "optimizer_state": 40800}
    assert per_rank_bytes(sizes, owner, 1, 3) == {"weights": 400, "gradients": 400, "optimizer_state": 800}
    assert optimizer_state_bytes([5000, 100], "adamw8bit") == 2 * 5000 + 8 * 20 + 8 * 100
    with pytest.raises(ValueError, match="optimizer must be adamw"):
        optimizer_state_bytes([1], "sgd")


def test_missing_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(world_mod, "_WORLD", None)
    monkeypatch.setenv("MINIPEFT_DIST_BACKEND", "mpi")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # as if it were not installed
    with pytest.raises(RuntimeError, match="mpi4py is not installed: pip install mpi4py mpich"):
        distributed.get_world()
    monkeypatch.setenv("MINIPEFT_DIST_BACKEND", "gloo")
    with pytest.raises(ValueError, match="'gloo' is not a backend"):
        distributed.get_world()
    monkeypatch.setenv("MINIPEFT_DIST_BACKEND", "nccl")
    monkeypatch.delenv("MINIPEFT_RANK", raising=False)
    with pytest.raises(RuntimeError, match="needs MINIPEFT_RANK and MINIPEFT_WORLD_SIZE"):
        distributed.get_world()


def test_launcher_refuses_bad_input(capsys):
    with pytest.raises(SystemExit) as e:
        launch_main(["--nproc", "2"])
    assert e.value.code == 2 and "-m MODULE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        launch_main(["--nproc", "0", "-m", "json.tool"])
    assert e.value.code == 2 and "must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("kind,optimizer", [("full", "adamw"), ("qlora", "adamw8bit")])
def test_one_shard_changes_nothing_and_shards_stay_close(kind, optimizer):
    """train() with a one-process DataParallel of one shard is train() itself; two shards differ by rounding."""
    plain = run_case(kind, optimizer, False, QUICK)["losses"]
    one = run_case(kind, optimizer, DataParallel(World(), stage=2, num_shards=1), QUICK)["losses"]
    two = run_case(kind, optimizer, DataParallel(World(), stage=3, num_shards=2), QUICK)["losses"]
    assert one == plain
    assert np.allclose(two, plain, rtol=1e-5)


def test_keep_only_drops_the_others_and_refuses_strangers():
    from minipeft.optim import AdamW, PagedAdamW

    a, b = (Tensor(np.ones(4, np.float32), requires_grad=True) for _ in range(2))
    for opt in (AdamW([("a", a), ("b", b)]), PagedAdamW([("a", a), ("b", b)], page_size=2)):
        a.grad, b.grad = np.ones(4, np.float32), np.ones(4, np.float32)
        opt.step()
        opt.keep_only(["b"])
        assert [n for n, _ in opt.named_params] == ["b"] and list(opt.state) == ["b"]
        assert [n for n, _ in opt.all_named_params] == ["a", "b"] and opt.state_bytes() == 32
        with pytest.raises(ValueError, match=r"\['c'\] are not parameters of this optimizer"):
            opt.keep_only(["c"])


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
_EXIT_SCRIPT = r'''
import atexit, multiprocessing, os, time
from minipeft.distributed.world import NCCLWorld

class Store:  # the shape of cupyx.distributed's TCPStore: a non-daemon server child that stops on a flag
    def __init__(self):
        self._run = multiprocessing.Value("b", 1)
        self._process = multiprocessing.Process(target=Store.loop, args=(self._run, os.getpid()))
        self._process.start()
    @staticmethod
    def loop(run, parent):
        while run.value == 1 and os.getppid() == parent:  # (the test's hang case kills the parent: then stop)
            time.sleep(0.05)
    def stop(self):
        with self._run.get_lock():
            self._run.value = 0
        self._process.join()

class Comm:
    _store = Store()

w = object.__new__(NCCLWorld)  # no GPU here: the world's exit path alone
w.comm = Comm()
if STOP:
    atexit.register(w.close)
print("main done", flush=True)
'''


@pytest.mark.parametrize("stop", [True, False])
def test_nccl_world_stops_the_rendezvous_store_at_exit(tmp_path, stop):
    """Rank 0 of an NCCL world exits although CuPy's TCP store runs in a non-daemon child (world.close)."""
    script = tmp_path / "rank0.py"
    script.write_text(f"STOP = {stop}\n" + _EXIT_SCRIPT)
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                              timeout=30 if stop else 4)
        exited = proc.returncode == 0 and "main done" in proc.stdout
    except subprocess.TimeoutExpired:
        exited = False
    assert exited is stop  # without close() the interpreter waits for the store's child at exit: the hang
