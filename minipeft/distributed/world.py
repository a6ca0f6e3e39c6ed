"""Who am I, how many are we, and how do we talk: rank, world size and backend, chosen once.

A *world* is the group of processes that train one model together (one per GPU, or one
per CPU rank). Every collective minipeft uses is a library's, never a home-made one:

* ``mpi``  — NumPy arrays through MPI (``mpi4py``; an MPI library from PyPI: ``pip install
  mpi4py mpich``). Chosen when the process was started by ``mpiexec``/``mpirun`` (they set
  ``PMI_RANK``/``PMI_SIZE``, ``OMPI_COMM_WORLD_SIZE`` or ``PMIX_RANK``) or by
  ``python -m minipeft.launch``.
* ``nccl`` — CuPy arrays through NCCL (``cupyx.distributed.init_process_group``, which
  exchanges NCCL's unique id over a small TCP store at ``CUPYX_DISTRIBUTED_HOST``/``PORT``).
  Chosen by ``MINIPEFT_DIST_BACKEND=nccl`` with ``MINIPEFT_RANK`` and ``MINIPEFT_WORLD_SIZE``,
  which ``python -m minipeft.launch --backend nccl`` sets (under ``mpiexec`` the rank and size
  are read from its variables instead).
* one process alone — ``World(rank=0, size=1, backend=None)``: every collective is the identity.

**Exact sums on the CPU.** Floating-point addition is not associative, and MPI's
``Allreduce`` picks its own order (recursive doubling adds ``(g0+g1)+(g2+g3)``), so a sum over
4 ranks need not equal the same 4 gradients accumulated one after another. ``allreduce_sum_``
and ``reduce_sum_`` on MPI therefore *gather* every rank's buffer and add them in rank order,
``((g0 + g1) + g2) + g3`` — exactly what one process computes when it accumulates the same
shards in that order. This costs N times the buffer on the receiving side (per bucket, so the
cost stays bounded). On NCCL the sum is NCCL's own (ring order): equal within float tolerance.

**Collectives in flight.** ``allreduce_sum_(buf, async_op=True)`` and ``reduce_sum_`` with it
return a ``Work`` (PyTorch's name) at once; its ``wait()`` returns when the sum is in ``buf``.
Data parallelism starts a bucket's reduction so while backward still runs. On MPI the gather
is nonblocking (``Iallgather``/``Igather``) and the rank-order sum is taken in ``wait()``, so the
result is bit for bit the blocking one; MPI moves the bytes mostly while some MPI call runs, so
on CPU ranks the overlap gains little. On NCCL the collective runs on a side CUDA stream that
first waits for an event recorded on the current stream (the gradients are written), and
``wait()`` makes the current stream wait for the collective's end: the reduction runs on the
GPU beside the backward kernels queued after it.
"""
from __future__ import annotations

import atexit
import os

import numpy as np

from ..backend import xp_of

BACKENDS = ("mpi", "nccl")
_MPI_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
_MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
_LOCAL_RANK_VARS = ("MINIPEFT_LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK")  # the GPU of a rank


class Work:
    """A collective in flight: ``wait()`` returns once its result is in the buffer (then does nothing)."""

    def __init__(self, finish=None, keep=()):
        self._finish, self._keep = finish, keep  # keep: arrays the collective uses until it ends

    def wait(self) -> None:
        finish, self._finish = self._finish, None
        if finish is not None:
            finish()
        self._keep = ()


def _done_or_work(work: Work, async_op: bool):
    """``work`` itself for ``async_op``; otherwise wait for it here."""
    if async_op:
        return work
    work.wait()
    return None


class World:
    """One process alone (``size == 1``): the base every backend extends.

    Collectives work in place on contiguous 1-D arrays (the buckets of ``data_parallel``).
    """

    backend: str | None = None

    def __init__(self, rank: int = 0, size: int = 1):
        self.rank, self.size = int(rank), int(size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size}, backend={self.backend!r})"

    # ---- the collectives (identity for one process)
    def allreduce_sum_(self, buf, async_op: bool = False) -> Work | None:
        """Replace ``buf`` on every rank by the sum of all ranks' ``buf`` (``async_op``: return a ``Work``)."""
        return _done_or_work(Work(), async_op)

    def reduce_sum_(self, buf, root: int, async_op: bool = False) -> Work | None:
        """Replace ``buf`` on ``root`` by the sum of all ranks' ``buf`` (others' ``buf`` is left as is)."""
        return _done_or_work(Work(), async_op)

    def broadcast_(self, buf, root: int) -> None:
        """Copy ``root``'s ``buf`` into every rank's ``buf``."""

    def allgather(self, arr):
        """``(size, *arr.shape)``: every rank's ``arr``, in rank order, on every rank."""
        return arr[None].copy()

    def gather_bytes(self, data: bytes, root: int = 0) -> list[bytes] | None:
        """Every rank's ``data`` (a list in rank order) on ``root``; ``None`` elsewhere."""
        return [data]

    def barrier(self) -> None:
        """Wait until every rank got here."""

    # ---- small helpers built on them
    def sum_floats(self, values: list[float]) -> list[float]:
        """Every rank's list of floats (equal lengths), concatenated in rank order."""
        arr = np.asarray(values, dtype=np.float64)
        return [float(v) for v in np.asarray(self.allgather(arr)).reshape(-1)]

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any rank."""
        return bool(np.asarray(self.allgather(np.asarray([int(flag)], dtype=np.int32))).any())


class MPIWorld(World):
    """Ranks of ``MPI.COMM_WORLD`` (mpi4py) on NumPy arrays."""

    backend = "mpi"

    def __init__(self):
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise RuntimeError("this process was started by an MPI launcher (mpiexec / python -m minipeft.launch) "
                               "but mpi4py is not installed: pip install mpi4py mpich "
                               "(or pip install -e '.[distributed]')") from e
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        super().__init__(self.comm.Get_rank(), self.comm.Get_size())

    @staticmethod
    def _check(buf) -> None:
        if not isinstance(buf, np.ndarray):
            raise TypeError(f"the MPI backend works on NumPy arrays, got {type(buf).__module__}."
                            f"{type(buf).__name__}: train on the CPU (MINIPEFT_DEVICE=cpu), or use the NCCL "
                            "backend for CuPy arrays (python -m minipeft.launch --backend nccl)")

    def _gathered(self, buf):
        rows = np.empty((self.size,) + buf.shape, dtype=buf.dtype)  # (N, n)
        self.comm.Allgather(buf, rows)
        return rows

    @staticmethod
    def _sum_in_rank_order(rows, out) -> None:
        acc = rows[0].copy()
        for r in range(1, rows.shape[0]):
            acc = acc + rows[r]  # ((g0 + g1) + g2) + ...: the order one process accumulates in
        out[...] = acc

    def allreduce_sum_(self, buf, async_op: bool = False):
        self._check(buf)
        rows = np.empty((self.size,) + buf.shape, dtype=buf.dtype)  # (N, n)
        request = self.comm.Iallgather(buf, rows)  # buf is not touched until the gather ends

        def finish():
            request.Wait()
            self._sum_in_rank_order(rows, buf)  # the rank-order sum, as the blocking call took it
        return _done_or_work(Work(finish, keep=(buf, rows)), async_op)

    def reduce_sum_(self, buf, root: int, async_op: bool = False):
        self._check(buf)
        rows = np.empty((self.size,) + buf.shape, dtype=buf.dtype) if self.rank == root else None  # (N, n)
        request = self.comm.Igather(buf, rows, root=root)

        def finish():
            request.Wait()
            if self.rank == root:
                self._sum_in_rank_order(rows, buf)
        return _done_or_work(Work(finish, keep=(buf, rows)), async_op)

    def broadcast_(self, buf, root: int) -> None:
        self._check(buf)
        self.comm.Bcast(buf, root=root)

    def allgather(self, arr):
        self._check(arr)
        return self._gathered(np.ascontiguousarray(arr))

    def gather_bytes(self, data: bytes, root: int = 0):
        return self.comm.gather(data, root=root)  # a bytes object travels as bytes

    def barrier(self) -> None:
        self.comm.Barrier()


class NCCLWorld(World):
    """One GPU per rank; CuPy arrays through NCCL (``cupyx.distributed``).

    The rank's GPU is ``MINIPEFT_LOCAL_RANK`` (default: the rank) among the visible devices.
    """

    backend = "nccl"

    def __init__(self, rank: int, size: int, local_rank: int | None = None):
        try:
            import cupy
            import cupyx.distributed
        except ImportError as e:
            raise RuntimeError("MINIPEFT_DIST_BACKEND=nccl needs CuPy with NCCL: pip install -e '.[gpu]'") from e
        super().__init__(rank, size)
        self.cupy = cupy
        cupy.cuda.Device(rank if local_rank is None else local_rank).use()
        try:  # the TCP store even where mpi4py is installed: these ranks were not started by mpiexec
            self.comm = cupyx.distributed.init_process_group(size, rank, force_store=True)
        except TypeError:  # a CuPy without force_store (it then uses the store unless asked for MPI)
            self.comm = cupyx.distributed.init_process_group(size, rank)
        atexit.register(self.close)  # after multiprocessing's own exit handler, so it runs before it

    def close(self) -> None:
        """Stop rank 0's TCP store (cupyx.distributed's rendezvous server).

        CuPy runs the store in a non-daemon child process that stops only when the store object is
        garbage-collected; at interpreter exit ``multiprocessing`` joins its non-daemon children
        first, so without this a finished rank 0 waits for that child forever (the likely reason an
        H200 run of the one-rank NCCL test did not return). Registered with ``atexit``; safe to call twice.
        """
        store = getattr(getattr(self, "comm", None), "_store", None)
        if store is not None and getattr(store, "_process", None) is not None:
            store.stop()
            store._process = None

    def _check(self, buf) -> None:
        if not isinstance(buf, self.cupy.ndarray):
            raise TypeError(f"the NCCL backend works on CuPy arrays, got {type(buf).__name__}: train on the GPU "
                            "(MINIPEFT_DEVICE=cuda), or use the MPI backend for NumPy arrays")

    def _on_side_stream(self, collective, buf, async_op: bool):
        """Blocking: ``collective(None)`` on the current stream. ``async_op``: on a side stream, after
        the work queued so far on the current stream, which ``wait()`` makes wait for its end."""
        if not async_op:
            collective(None)
            return None
        cuda = self.cupy.cuda
        if getattr(self, "_side", None) is None:
            self._side = cuda.Stream(non_blocking=True)
        ready = cuda.Event(disable_timing=True)
        ready.record()  # on the current stream: buf holds the gradients once it is reached
        self._side.wait_event(ready)
        collective(self._side)
        done = cuda.Event(disable_timing=True)
        done.record(self._side)
        return Work(lambda: cuda.get_current_stream().wait_event(done), keep=(buf,))

    def allreduce_sum_(self, buf, async_op: bool = False):
        self._check(buf)
        return self._on_side_stream(lambda stream: self.comm.all_reduce(buf, buf, "sum", stream=stream), buf, async_op)

    def reduce_sum_(self, buf, root: int, async_op: bool = False):
        self._check(buf)
        return self._on_side_stream(lambda stream: self.comm.reduce(buf, buf, root, "sum", stream=stream), buf,
                                    async_op)

    def broadcast_(self, buf, root: int) -> None:
        self._check(buf)
        self.comm.broadcast(buf, root)

    def allgather(self, arr):
        xp = self.cupy
        arr = xp.ascontiguousarray(xp.asarray(arr))
        out = xp.empty((self.size,) + arr.shape, dtype=arr.dtype)
        self.comm.all_gather(arr, out, arr.size)
        return out.get()  # small things (losses, norms, flags, lengths) come back to the host

    def gather_bytes(self, data: bytes, root: int = 0):
        xp = self.cupy
        lengths = self.allgather(np.asarray([len(data)], dtype=np.int64)).reshape(-1)  # (N,)
        width = int(lengths.max())
        mine = np.zeros(width, dtype=np.uint8)
        mine[:len(data)] = np.frombuffer(data, dtype=np.uint8)
        rows = self.allgather(xp.asarray(mine))  # (N, width)
        if self.rank != root:
            return None
        return [rows[r, :lengths[r]].tobytes() for r in range(self.size)]

    def barrier(self) -> None:
        self.comm.barrier()


_WORLD: World | None = None


def _env_int(names, default=None):
    for n in names:
        if os.environ.get(n, "") != "":
            return int(os.environ[n])
    return default


def detect_backend() -> str | None:
    """The backend the environment asks for: ``MINIPEFT_DIST_BACKEND``, else ``mpi`` under an MPI launcher."""
    name = os.environ.get("MINIPEFT_DIST_BACKEND", "").strip().lower()
    if name:
        if name not in BACKENDS:
            raise ValueError(f"MINIPEFT_DIST_BACKEND={name!r} is not a backend; use one of {BACKENDS}")
        return name
    if (_env_int(_MPI_SIZE_VARS) or 1) > 1:
        return "mpi"
    return None


def get_world() -> World:
    """The world of this process, built at the first call and the same ever after."""
    global _WORLD
    if _WORLD is None:
        backend = detect_backend()
        if backend == "mpi":
            _WORLD = MPIWorld()
        elif backend == "nccl":
            rank = _env_int(("MINIPEFT_RANK",) + _MPI_RANK_VARS)  # the launcher's, or mpiexec's
            size = _env_int(("MINIPEFT_WORLD_SIZE",) + _MPI_SIZE_VARS)
            if rank is None or size is None:
                raise RuntimeError("MINIPEFT_DIST_BACKEND=nccl needs MINIPEFT_RANK and MINIPEFT_WORLD_SIZE: start the "
                                   "ranks with python -m minipeft.launch --backend nccl --nproc N -m MODULE")
            _WORLD = NCCLWorld(rank, size, _env_int(_LOCAL_RANK_VARS))
        else:
            _WORLD = World()
    return _WORLD


def xp_buffer(like, n: int, dtype):
    """A zeroed 1-D buffer of ``n`` elements on the device of ``like``."""
    return xp_of(like).zeros(n, dtype=dtype)
