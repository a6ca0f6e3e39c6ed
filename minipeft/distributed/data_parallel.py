"""Data parallelism and the three ZeRO stages, as one object ``train()`` calls at fixed points.

Data parallelism (DP): every rank holds the whole model, takes its own shard of each batch,
and the ranks sum their gradients before the optimizer step, so every rank takes the same
step — the step one process would take on the whole batch. ZeRO (Rajbhandari et al. 2020,
"ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", Sec. 5 and 7)
removes DP's redundancy one kind of state at a time; with Ψ trainable parameters, N_d
ranks and K bytes of optimizer state per parameter:

========  ====================================  =================================================
stage     each rank keeps                        communication per step (paper, Sec. 7)
========  ====================================  =================================================
0 (DP)    weights, gradients, optimizer state    all-reduce of the gradients (2Ψ)
1  P_os   its 1/N_d of the optimizer state       all-reduce of gradients; each owner updates its
                                                 weights and sends them to all (all-gather): 2Ψ
2  P_os+g and only its 1/N_d of the gradients    reduce-scatter (each bucket reduced to its owner,
                                                 the rest freed) + all-gather of weights: 2Ψ
3  P_os+g+p and only its 1/N_d of the weights    + all-gather of the weights before forward: 3Ψ
========  ====================================  =================================================

How this code maps onto ``train()``'s step (``train.py`` calls exactly these methods)::

    zero_grad()            every trainable parameter's grad dropped (the optimizer may own fewer)
    gather_parameters()    stage 3: owners broadcast their weights (the all-gather before forward)
    local_shards(batch)    this rank's rows of the global batch
    ... forward, backward of each shard, seeded with 1 / num_shards ...
    reduce_gradients()     bucketed: all-reduce (stages 0-1) or reduce to the owner (2-3); with
                           overlap the last backward started some buckets already
    gather_losses(...)     every shard's loss, in (micro-batch, shard) order, on every rank
    clip_grad_norm_(c)     the global norm from every owner's squared norms
    finish_step(opt, ok)   the optimizer updates the owned parameters, owners broadcast the new
                           weights (stages 1-3), stage 3 frees the weights it does not own

**Overlap.** DDP starts a bucket's all-reduce while backward is still computing earlier layers
(Li et al. 2020, Sec. 3.2.3), and so does this code. The gradient buckets hold the parameters in
reverse order, the order backward produces their gradients (last layer first), as DDP's do. Before
the step's last backward a hook (``register_post_accumulate_grad_hook``) goes on every parameter;
it marks the gradient ready, and a bucket's reduction starts (``async_op=True``) as soon as all its
members are ready and every earlier bucket has started: the same order on every rank, since MPI
and NCCL match collectives by the order they are issued. Earlier micro-batches only accumulate
(``local_shards(batch, last_micro_batch=False)``: DDP's ``no_sync``). A bucket with a parameter
this rank's shard never reached waits, with every later bucket, for ``reduce_gradients()``, which
starts the rest (zeros for missing gradients), waits for all of them in order, and then agrees
with the other ranks on which parameters had a gradient anywhere. What overlap buys depends on
the engine: NCCL runs the reduction on its own CUDA stream beside the backward kernels; MPI on
CPU ranks moves a nonblocking collective's bytes mostly inside MPI calls, so there the gain is
small. ``DataParallel(overlap=False)`` starts every bucket after backward; on MPI the results
are the same bit for bit either way. ``launches`` counts the buckets started during and after
backward.

**Exact on the CPU.** With the MPI backend every sum is taken in rank order (``world.py``), so
N ranks with one shard each give bit for bit the losses and weights of one process that runs
the same N shards one after another, accumulating their gradients (``DataParallel(World(),
num_shards=N)``; the engine adds gradients in that order, ``((g0+g1)+g2)+g3``). One process
with the whole batch in one forward agrees within float32 rounding only: splitting a sum over
B·T rows into N partial sums changes its rounding. With ``grad_accum_steps`` > 1 each rank first
adds its own micro-batches, one process adds them micro-batch by micro-batch: the losses of the first
step are equal, later ones within rounding.

**Stage 3's granularity.** Here weights are gathered for the whole forward and backward of a
step and freed after it (minipeft's Modules have no forward hooks, and backward keeps weights
it saved): between steps a rank holds Ψ_r weights, as the paper says; during a step it holds
all Ψ. DeepSpeed gathers layer by layer and frees after each use.

Only trainable parameters (those the optimizer holds) are synchronized and partitioned; frozen
weights (the base model under LoRA or QLoRA) are the same on every rank and stay whole.
"""
from __future__ import annotations

import contextlib
import json

import numpy as np

from .. import random as mp_random
from ..backend import to_numpy, xp_of
from ..optim import clip_grad_norm_
from .buckets import DEFAULT_BUCKET_BYTES, make_buckets, partition
from .world import World, get_world

STAGES = (0, 1, 2, 3)


def _rows(batch, start: int, stop: int):
    """Rows ``start:stop`` (axis 0) of a batch: an array, a tuple/list of arrays, or a dict of arrays."""
    if isinstance(batch, dict):
        return {k: v[start:stop] for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(v[start:stop] for v in batch)
    return batch[start:stop]


def _in_own_streams(shards, base: int, before_last=None):
    for i, (index, shard) in enumerate(shards):
        if before_last is not None and i == len(shards) - 1:
            before_last()  # the step's last backward on this rank follows
        with mp_random.fork(base + index):
            yield shard


def _batch_rows(batch) -> int:
    first = next(iter(batch.values())) if isinstance(batch, dict) else (
        batch[0] if isinstance(batch, (tuple, list)) else batch)
    return int(first.shape[0])


class DataParallel:
    """Data-parallel training over ``world`` with ZeRO ``stage`` 0 (plain DP), 1, 2 or 3.

    ``num_shards``: how many equal shards each global batch is cut into (default: the world
    size; a multiple of it: each rank runs ``num_shards / size`` of them one after another).
    ``DataParallel(World(), num_shards=N)`` is the one-process run the N-rank run equals.
    ``bucket_bytes``: the largest flat buffer a collective moves at once.
    ``overlap``: start each bucket's reduction during the step's last backward, once its gradients
    are ready (True), or every bucket after backward (False); the results are the same.
    """

    def __init__(self, world: World | None = None, stage: int = 0, num_shards: int | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, overlap: bool = True):
        self.world = world if world is not None else get_world()
        if stage not in STAGES:
            raise ValueError(f"ZeRO stage must be one of {STAGES} (0 = plain data parallelism), got {stage!r}")
        self.stage = int(stage)
        n = self.world.size if num_shards is None else int(num_shards)
        if n < 1 or n % self.world.size:
            raise ValueError(f"num_shards ({num_shards}) must be a positive multiple of the world size "
                             f"({self.world.size})")
        self.num_shards, self.bucket_bytes = n, int(bucket_bytes)
        self.named_params: list = []  # every trainable (name, Parameter), in the optimizer's order
        self.owner: dict[str, int] = {}
        self.traffic = {"all-reduce": 0, "reduce": 0, "broadcast": 0}  # bytes this rank handed to each collective
        self.overlap = bool(overlap)
        self.launches = {"during backward": 0, "after backward": 0}  # gradient buckets started, by when
        self._hooks: list = []  # gradient-ready hooks, on the parameters during the step's last backward
        self._ready: set[int] = set()  # id of each parameter whose gradient is final
        self._in_flight: list = []  # (bucket, flat buffer, Work), in the buckets' order

    def __repr__(self) -> str:
        return f"DataParallel(stage={self.stage}, {self.world!r}, num_shards={self.num_shards})"

    @property
    def rank(self) -> int:
        return self.world.rank

    # ------------------------------------------------------------------ setup
    def setup(self, model, optimizer) -> None:
        """Partition ``optimizer``'s parameters; make every rank start from rank 0's weights.

        Call it after a checkpoint was loaded (into the whole optimizer): stage >= 1 then keeps
        only the owned parameters' optimizer state, stage 3 only the owned weights.
        """
        self.named_params = list(getattr(optimizer, "all_named_params", None) or optimizer.named_params)
        self._shapes = {n: tuple(p.data.shape) for n, p in self.named_params}
        self.owner = partition([(n, int(p.data.size)) for n, p in self.named_params], self.world.size)
        # reversed: backward makes the last layer's gradients first (DDP's order), so buckets fill in order
        self._grad_buckets = make_buckets(self.named_params[::-1], self.owner if self.stage >= 2 else None,
                                          self.bucket_bytes)
        self._bucket_of = {id(p): i for i, b in enumerate(self._grad_buckets) for _, p in b.members}
        self._owner_buckets = make_buckets(self.named_params, self.owner, self.bucket_bytes)
        self._bcast(make_buckets(self.named_params, {n: 0 for n in self.owner}, self.bucket_bytes), count=False)
        if self.stage >= 1:
            optimizer.keep_only(self.owned_names())
        if self.stage == 3:
            self.release_parameters()

    def owned_names(self) -> list[str]:
        return [n for n, _ in self.named_params if self.owner[n] == self.rank]

    # ------------------------------------------------------------------ batches
    def local_shards(self, batch, last_micro_batch: bool = True):
        """This rank's shards of the global ``batch`` (rows split evenly, rank r's in the r-th place).

        ``last_micro_batch``: whether the backward of this batch's last shard completes the step's
        gradients; with ``overlap`` the gradient reduction then starts during that backward. Pass
        False for every micro-batch of a step but the last (gradient accumulation).

        Iterate over the result: while a shard is being used, ``minipeft.random`` (dropout) draws
        from a stream seeded by the shard's global index and one draw per global batch from the
        run's stream, the same on every rank. So dropout masks depend on the shard, not on the
        rank that computes it, and N ranks equal one process running the N shards in turn.
        """
        rows = _batch_rows(batch)
        if rows % self.num_shards:
            raise ValueError(f"a batch of {rows} sequences cannot be split evenly into {self.num_shards} shards "
                             f"(world size {self.world.size}): make batch_size a multiple of {self.num_shards}")
        per = rows // self.num_shards
        k = self.num_shards // self.world.size  # shards per rank
        first = self.rank * k
        shards = [(first + i, _rows(batch, (first + i) * per, (first + i + 1) * per)) for i in range(k)]
        base = int(mp_random.generator("cpu").integers(2**62))  # every rank draws it: the streams stay equal
        return _in_own_streams(shards, base, self._arm if self.overlap and last_micro_batch else None)

    def gather_losses(self, local: list[float], micro_batches: int) -> list[float]:
        """Every shard's loss in the order one process would see them: micro-batch, then shard."""
        if self._in_flight:  # collectives match by order: another one now would pair with a bucket elsewhere
            raise RuntimeError("gather_losses() while gradient buckets are being reduced: call reduce_gradients() "
                               "first (every rank then issues its collectives in the same order)")
        k = self.num_shards // self.world.size
        everyone = np.asarray(self.world.sum_floats(local)).reshape(self.world.size, micro_batches, k)
        return [float(v) for v in everyone.transpose(1, 0, 2).reshape(-1)]

    # ------------------------------------------------------------------ gradients
    def zero_grad(self) -> None:
        if self._in_flight:
            raise RuntimeError("gradient reductions started by the last step's backward were never finished: "
                               "call reduce_gradients() after the step's last backward")
        self._disarm()
        for _, p in self.named_params:
            p.grad = None

    def _flat(self, bucket, what: str):
        """Copy the members' grads (``what='grad'``; zeros where there is none) or weights into one new flat buffer."""
        xp = xp_of(bucket.members[0][1].data)
        flat = xp.zeros(bucket.numel, dtype=bucket.dtype)  # (numel,)
        off = 0
        for name, p in bucket.members:
            n = int(np.prod(self._shapes[name]))
            src = p.grad if what == "grad" else p.data
            if src is not None and src.size:
                flat[off:off + n] = src.reshape(-1)
            off += n
        return flat

    def _unflat(self, bucket, flat, what: str) -> None:
        off = 0
        for name, p in bucket.members:
            shape = self._shapes[name]
            n = int(np.prod(shape))
            piece = flat[off:off + n].reshape(shape)
            if what == "grad":
                p.grad = piece.copy()
            elif p.data.shape == shape:
                p.data[...] = piece
            else:
                p.data = piece.copy()  # ZeRO-3: a released weight comes back
            off += n

    # ---- overlap: buckets start from inside backward
    def _arm(self) -> None:
        """Hook every parameter before the step's last backward: a ready gradient may start its bucket."""
        if self._in_flight:
            raise RuntimeError("a gradient bucket was already being reduced when another backward began: pass "
                               "local_shards(batch, last_micro_batch=False) for every micro-batch but a step's last")
        self._disarm()
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_ready)
                       for _, p in self.named_params if p.requires_grad]

    def _disarm(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._ready = [], set()

    def _grad_ready(self, p) -> None:
        """The hook: ``p.grad`` is final; start every bucket, in order, whose members are all ready."""
        if self._bucket_of[id(p)] < len(self._in_flight):
            raise RuntimeError("a gradient changed after its bucket's reduction started: one backward per step "
                               "may follow local_shards(batch, last_micro_batch=True)")
        self._ready.add(id(p))
        buckets = self._grad_buckets
        while len(self._in_flight) < len(buckets) and all(
                id(q) in self._ready for _, q in buckets[len(self._in_flight)].members):
            self._start(buckets[len(self._in_flight)], "during backward")

    def _start(self, b, when: str) -> None:
        flat = self._flat(b, "grad")
        if b.owner is None:
            work = self.world.allreduce_sum_(flat, async_op=True)
        else:
            work = self.world.reduce_sum_(flat, b.owner, async_op=True)
        self.traffic["all-reduce" if b.owner is None else "reduce"] += int(flat.nbytes)
        self.launches[when] += 1
        self._in_flight.append((b, flat, work))

    def reduce_gradients(self) -> None:
        """Sum every rank's gradients: all-reduce (stages 0-1); reduce to the owner, free the rest (2-3).

        The buckets backward did not start (all of them without ``overlap``) start now, in order;
        then each is waited for, in order. A parameter without a gradient on some rank (unused by
        its shard) counts as zeros there; one without a gradient on every rank keeps ``grad = None``
        (the optimizer skips it, as alone).
        """
        mine = np.asarray([p.grad is not None for _, p in self.named_params], dtype=np.int32)  # (n_params,)
        self._disarm()
        for b in self._grad_buckets[len(self._in_flight):]:
            self._start(b, "after backward")
        for b, flat, work in self._in_flight:
            work.wait()
            if b.owner is None or b.owner == self.rank:
                self._unflat(b, flat, "grad")
            else:
                for _, p in b.members:
                    p.grad = None  # stage 2: another rank owns this gradient
        self._in_flight = []
        anywhere = self.world.allgather(mine).max(axis=0) > 0  # after every bucket, on every rank
        for (_, p), used in zip(self.named_params, anywhere):
            if not used:
                p.grad = None

    def _held_grads(self) -> list:
        return [p for _, p in self.named_params if p.grad is not None]

    def unscale_(self, scaler) -> bool:
        """float16 loss scaling: unscale the gradients this rank holds; True on every rank if any overflowed."""
        found = scaler.unscale_(self._held_grads())
        return self.world.any(found) if scaler.enabled else found

    def clip_grad_norm_(self, max_norm: float) -> float:
        """``clip_grad_norm_`` over every rank's gradients: the same norm, the same scale, as one process.

        Each parameter's squared norm is computed by a rank holding its gradient (its owner from
        stage 2 on), gathered, and summed in the optimizer's parameter order.
        """
        if self.stage < 2:  # every rank holds every (summed) gradient: the one-process function
            return clip_grad_norm_(self._held_grads(), max_norm) if self._held_grads() else 0.0
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        xp = xp_of(self.named_params[0][1].data)
        mine = np.zeros((2, len(self.named_params)), dtype=np.float32)  # (squared norm | held, n_params)
        for i, (name, p) in enumerate(self.named_params):
            if p.grad is not None:  # from stage 2 on only the owner holds it
                mine[0, i] = float(xp.sum(p.grad.astype(np.float32) ** 2))
                mine[1, i] = 1
        rows = self.world.allgather(mine)  # (N, 2, n_params)
        held = rows[:, 1, :].max(axis=0) > 0
        sq = rows[:, 0, :].sum(axis=0)[held]  # one rank holds each: adding zeros is exact
        total = float(xp.sqrt(xp.asarray(sq).sum())) if sq.size else 0.0
        coef = max_norm / (total + 1e-6)  # torch's (and clip_grad_norm_'s) formula
        if coef < 1.0:
            for p in self._held_grads():
                p.grad = p.grad * p.grad.dtype.type(coef)
        return total

    # ------------------------------------------------------------------ the step and the weights
    def _bcast(self, buckets, count: bool = True) -> None:
        for b in buckets:
            flat = self._flat(b, "data")
            self.world.broadcast_(flat, b.owner)
            self._unflat(b, flat, "data")
            self.traffic["broadcast"] += int(flat.nbytes) if count else 0

    def gather_parameters(self) -> None:
        """Stage 3: every owner sends its weights to all (the all-gather before forward)."""
        if self.stage == 3:
            self._bcast(self._owner_buckets)

    def release_parameters(self) -> None:
        """Stage 3: drop the weights another rank owns (a size-0 array keeps the dtype and device)."""
        for name, p in self.named_params:
            if self.owner[name] != self.rank:
                p.data = xp_of(p.data).empty(0, dtype=p.data.dtype)

    def finish_step(self, optimizer, update: bool = True) -> None:
        """The optimizer step (skipped when ``update`` is False), then the owners' new weights to all."""
        if update:
            optimizer.step()
        if self.stage in (1, 2):
            self._bcast(self._owner_buckets)  # the all-gather of updated weights
        elif self.stage == 3:
            self.release_parameters()  # the next forward gathers the updated weights

    @contextlib.contextmanager
    def full_parameters(self):
        """Every weight present inside (stage 3 gathers, then releases); evaluation and saving use it."""
        if self.stage == 3:
            self._bcast(self._owner_buckets, count=False)  # not part of a training step's traffic
        try:
            yield
        finally:
            if self.stage == 3:
                self.release_parameters()

    # ------------------------------------------------------------------ checkpoints and memory
    def full_optimizer(self, optimizer):
        """An object whose ``state_dict()`` is the whole optimizer's, on rank 0 (None elsewhere).

        Stage 0 returns ``optimizer`` itself; from stage 1 every rank sends its owned state to
        rank 0 (a collective: every rank must call it). The checkpoint then has the format of a
        one-process run, so it resumes with any world size.
        """
        if self.stage == 0:
            return optimizer
        from safetensors.numpy import load, save

        sd = optimizer.state_dict()
        arrays = {f"{n}\x00{k}": np.ascontiguousarray(to_numpy(v)) for n, st in sd["state"].items()
                  for k, v in st.items() if hasattr(v, "shape")}
        scalars = {n: {k: v for k, v in st.items() if not hasattr(v, "shape")} for n, st in sd["state"].items()}
        blobs = self.world.gather_bytes(save(arrays, metadata={"scalars": json.dumps(scalars)}), root=0)
        if blobs is None:
            return None
        merged = {}
        for blob in blobs:
            scal = json.loads(_metadata(blob)["scalars"])
            arrs = load(blob)
            for n, st in scal.items():
                merged[n] = dict(st)
            for key, a in arrs.items():
                n, k = key.split("\x00")
                merged[n][k] = a
        full = dict(sd, param_names=[n for n, _ in self.named_params],
                    state={n: merged[n] for n, _ in self.named_params if n in merged})
        return _FixedState(full)

    def save_checkpoint(self, path, model, optimizer, scheduler=None, **kwargs) -> None:
        """``checkpoint.save_checkpoint`` written once, by rank 0, with every weight and all optimizer state.

        Every rank must call it (it gathers); the file is the one a single process writes.
        """
        from .. import checkpoint as ckpt

        with self.full_parameters():
            whole = self.full_optimizer(optimizer)
            if self.rank == 0:
                ckpt.save_checkpoint(path, model, whole, scheduler, **kwargs)
        self.world.barrier()

    def memory(self, model, optimizer) -> dict:
        """Bytes this rank holds now: trainable weights, their gradients, optimizer state, frozen weights."""
        trainable = {id(p) for _, p in self.named_params}
        frozen = sum(int(p.data.nbytes) for p in model.parameters() if id(p) not in trainable)
        return {"weights": sum(int(p.data.nbytes) for _, p in self.named_params),
                "gradients": sum(int(p.grad.nbytes) for _, p in self.named_params if p.grad is not None),
                "optimizer_state": int(optimizer.state_bytes()), "frozen_weights": frozen}


def _metadata(blob: bytes) -> dict:
    """The ``__metadata__`` of a safetensors byte string (8-byte header length, then a JSON header)."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]).get("__metadata__", {})


class _FixedState:
    """Stands for an optimizer in ``save_checkpoint``: it only answers ``state_dict()``."""

    def __init__(self, sd: dict):
        self._sd = sd

    def state_dict(self) -> dict:
        return self._sd


def auto_data_parallel():
    """``DataParallel`` (stage 0) when this process is one of several ranks; ``None`` alone."""
    world = get_world()
    return DataParallel(world) if world.size > 1 else None
