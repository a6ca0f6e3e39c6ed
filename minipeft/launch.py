"""Start N ranks of a module: ``python -m minipeft.launch --nproc N -m MODULE ARGS...``.

One process per rank; each finds its rank, the world size and the backend in its environment
(``minipeft.distributed.get_world()``), so the module itself is the same one you run alone —
``train()`` turns data-parallel by itself when it sees several ranks.

* ``--backend mpi`` (the default without ``MINIPEFT_DEVICE=cuda``): the ranks are started by
  ``mpiexec -n N`` (MPICH's from ``pip install mpich``, or any on the PATH), which sets
  ``PMI_RANK``/``PMI_SIZE``; they talk through mpi4py on NumPy arrays. A module started by
  ``mpiexec``/``mpirun`` directly works the same way.
* ``--backend nccl`` (the default with ``MINIPEFT_DEVICE=cuda``): the launcher starts N
  processes itself with ``MINIPEFT_RANK``, ``MINIPEFT_WORLD_SIZE``, ``MINIPEFT_LOCAL_RANK`` (the
  GPU) and the address of the TCP store (``CUPYX_DISTRIBUTED_HOST``/``PORT``) that
  ``cupyx.distributed`` uses to hand NCCL's unique id to every rank.

CPU ranks share the cores: unless set already, each rank's BLAS gets ``cores // N`` threads.
The exit code is the first non-zero one of the ranks (0 when all succeed).
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def find_mpiexec() -> str | None:
    """``mpiexec`` beside this Python (``pip install mpich`` puts it there), else on the PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minipeft.launch", description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [--nproc N] [--backend mpi|nccl] -m MODULE [ARGS...]")
    p.add_argument("--nproc", type=int, default=2, help="number of ranks (default 2)")
    p.add_argument("--backend", choices=("mpi", "nccl"), default=None,
                   help="mpi (NumPy on CPU ranks) or nccl (CuPy, one GPU per rank); default from MINIPEFT_DEVICE")
    p.add_argument("-m", dest="module", metavar="MODULE", help="the module to run on every rank; what follows "
                   "it are the module's own arguments")
    return p


def rank_env(backend: str, nproc: int, base: dict | None = None) -> dict:
    """The environment every rank starts with (without the per-rank variables of NCCL)."""
    env = dict(os.environ if base is None else base)
    env["MINIPEFT_DIST_BACKEND"] = backend
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    for var in _THREAD_VARS:
        env.setdefault(var, threads)
    return env


def _run_mpi(nproc: int, module: str, args: list[str]) -> int:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        print("python -m minipeft.launch: error: the MPI backend needs mpi4py and an MPI library: "
              "pip install mpi4py mpich", file=sys.stderr)
        return 2
    mpiexec = find_mpiexec()
    if mpiexec is None:
        print("python -m minipeft.launch: error: no mpiexec beside this Python or on the PATH: pip install mpich",
              file=sys.stderr)
        return 2
    cmd = [mpiexec, "-n", str(nproc), sys.executable, "-m", module, *args]
    return subprocess.call(cmd, env=rank_env("mpi", nproc))


def _run_nccl(nproc: int, module: str, args: list[str]) -> int:
    env = rank_env("nccl", nproc)
    env.setdefault("MINIPEFT_DEVICE", "cuda")
    env["CUPYX_DISTRIBUTED_HOST"], env["CUPYX_DISTRIBUTED_PORT"] = "127.0.0.1", str(_free_port())
    procs = []
    for rank in range(nproc):
        env_r = dict(env, MINIPEFT_RANK=str(rank), MINIPEFT_WORLD_SIZE=str(nproc), MINIPEFT_LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, "-m", module, *args], env=env_r))
    codes = [None] * nproc
    try:
        while any(c is None for c in codes):
            for i, pr in enumerate(procs):
                if codes[i] is None:
                    try:
                        codes[i] = pr.wait(timeout=0.5)
                    except subprocess.TimeoutExpired:
                        continue
                    if codes[i] != 0:  # one rank failed: the others would wait for it forever
                        for other in procs:
                            if other.poll() is None:
                                other.terminate()
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
    return next((c for c in codes if c), 0)


def main(argv=None) -> int:
    p = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-m" not in argv or argv.index("-m") == len(argv) - 1:
        p.exit(2, f"{p.prog}: error: say which module every rank runs: -m MODULE [ARGS...]\n")
    i = argv.index("-m")
    ns = p.parse_args(argv[:i])  # the launcher's own flags come before -m ...
    ns.module, args = argv[i + 1], argv[i + 2:]  # ... everything after the module is the module's
    if ns.nproc < 1:
        p.exit(2, f"{p.prog}: error: --nproc {ns.nproc}: must be at least 1\n")
    backend = ns.backend or ("nccl" if os.environ.get("MINIPEFT_DEVICE", "cpu") == "cuda" else "mpi")
    run = _run_mpi if backend == "mpi" else _run_nccl
    return run(ns.nproc, ns.module, args)


if __name__ == "__main__":
    sys.exit(main())
