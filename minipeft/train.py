"""The one training loop every lesson uses.

Each optimizer step (Goodfellow et al. 2016, Alg. 8.1, with the practical additions of
GPT-2/nanoGPT-style training):

1. set the learning rate from the schedule (warmup, then constant/linear/cosine);
2. for each of ``grad_accum_steps`` micro-batches: draw a batch with the trainer's own
   ``numpy.random.Generator``, compute the loss, and backpropagate ``loss / k``, so the
   accumulated gradient is the mean over micro-batches (equal to one big batch);
3. clip the gradients by global norm (optional), take the optimizer step;
   with ``compute_dtype='float16'`` the forward runs under ``minipeft.amp.autocast``, the
   backward starts from the loss scale, and the gradients are unscaled first; a step
   whose gradients overflowed is skipped (``minipeft.amp.GradScaler``);
4. every ``eval_every`` steps evaluate (model in eval mode, no graph), every
   ``checkpoint_every`` steps save a checkpoint (``minipeft.checkpoint``).

``label_smoothing`` (Szegedy et al. 2016, §7; the LoRA paper's E2E recipe uses 0.1)
smooths the *training* targets only: every evaluation reports the plain cross-entropy.
``EarlyStopping`` (``minipeft.early_stopping``) is the callback that stops on a validation metric; it ignores the
evaluations made before ``min_step`` (set it to the warm-up), so it cannot fire while the
learning rate is still rising, and it can keep the weights of the best evaluation.

Resume is exact on the CPU: a checkpoint holds the weights, optimizer moments and step
counts, the scheduler's step, the batch generator's state and ``minipeft.random``'s state
(dropout), so ``train(..., resume=True)`` continues the very same loss trajectory.
Evaluation saves and restores ``minipeft.random``'s state, so evaluating does not change
what training sees.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from . import checkpoint as ckpt
from . import random as mp_random
from .backend import xp_of
from .engine import Tensor, no_grad
from .amp import GradScaler, autocast, check_compute_dtype
from .optim import SCHEDULES, AdamW, LRScheduler, Optimizer, clip_grad_norm_, get_schedule


@dataclass
class TrainConfig:
    max_steps: int = 100  # optimizer steps in the whole run
    batch_size: int = 8  # sequences per micro-batch (for the batch source; also logged)
    grad_accum_steps: int = 1  # micro-batches per optimizer step; their gradients are averaged
    lr: float = 3e-4  # peak learning rate; the schedule sets optimizer.lr every step
    schedule: str = "cosine"  # 'constant' | 'linear' | 'cosine' (with linear warmup)
    warmup_steps: int = 0  # steps of linear warmup from 0 to lr
    min_lr: float = 0.0  # floor of the linear/cosine decay, reached at max_steps
    weight_decay: float = 0.01  # used when train() builds the AdamW itself (torch's default)
    grad_clip: float | None = 1.0  # max global L2 norm of the gradients; None = no clipping
    eval_every: int = 0  # evaluate every N steps (and at the end); 0 = only at the end
    eval_batches: int = 10  # batches averaged by the built-in evaluation (get_eval_batch)
    checkpoint_every: int = 0  # save every N steps (and at the end); 0 = never
    checkpoint_dir: str | None = None  # where step_XXXXXXXX/ checkpoints go
    keep_checkpoints: int | None = None  # keep only the newest N checkpoints; None = keep all
    seed: int = 0  # seeds the batch generator and minipeft.random (dropout)
    log_every: int = 0  # print a log line every N steps; 0 = none (the progress bar shows it)
    progress: bool = True  # tqdm progress bar with loss and tokens/s
    compute_dtype: str = "float32"  # matmul precision: 'float16' adds dynamic loss scaling (minipeft.amp)
    label_smoothing: float = 0.0  # training targets (1-eps) one-hot + eps/V (Szegedy et al. 2016); eval stays plain CE
    run_name: str = "train"  # names the progress bar and log lines (say which method / seed a run is)

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum_steps"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {v!r}")
        for name in ("warmup_steps", "eval_every", "eval_batches", "checkpoint_every", "log_every", "seed"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"TrainConfig.{name} must be a non-negative integer, got {v!r}")
        check_compute_dtype(self.compute_dtype)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be a positive number, got {self.lr!r}")
        if self.grad_clip is not None and not (self.grad_clip > 0 and math.isfinite(self.grad_clip)):
            raise ValueError(f"TrainConfig.grad_clip must be a finite number > 0, or None for no clipping, "
                             f"got {self.grad_clip!r}")
        for name in ("min_lr", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {v!r}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("checkpoint_every is set but checkpoint_dir is not: say where checkpoints go")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1 or None, got {self.keep_checkpoints}")
        eps = self.label_smoothing
        if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not 0.0 <= eps < 1.0:
            raise ValueError(f"TrainConfig.label_smoothing must be a number in [0, 1) (0.1 in the LoRA paper's "
                             f"E2E recipe; 0 = plain cross-entropy), got {eps!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a dict, refusing unknown keys (with the list of known ones)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


# Fields that change the loss trajectory: a resume must use the same values.
_TRAJECTORY_FIELDS = ("batch_size", "grad_accum_steps", "lr", "schedule", "warmup_steps", "min_lr",
                      "grad_clip", "seed", "compute_dtype", "label_smoothing")


class StepRecord(NamedTuple):
    step: int  # optimizer steps completed (1 for the first)
    train_loss: float  # mean loss over this step's micro-batches
    lr: float  # learning rate used by this step
    tokens_per_sec: float  # tokens in this step's batches / wall time of the step


@dataclass
class TrainResult:
    history: list[StepRecord] = field(default_factory=list)
    eval_history: list[tuple[int, dict]] = field(default_factory=list)  # (step, metrics)
    grad_norms: list[float] = field(default_factory=list)  # before clipping (empty without clipping)
    step_times: list[float] = field(default_factory=list)  # seconds per optimizer step
    skipped_steps: int = 0  # float16 steps skipped because a scaled gradient overflowed
    final: dict = field(default_factory=dict)  # last train loss, last eval metrics, throughput
    wall_time: float = 0.0  # seconds spent in this call of train()
    resumed_from: int | None = None  # step of the checkpoint resumed from

    @property
    def losses(self) -> list[float]:
        return [h.train_loss for h in self.history]


def default_loss_fn(model, batch, label_smoothing: float = 0.0) -> Tensor:
    """``model(x, targets=y).loss`` for a batch ``(x, y)`` (with ``label_smoothing`` when it is not 0)."""
    x, y = batch
    if label_smoothing:
        return model(x, targets=y, label_smoothing=label_smoothing).loss
    return model(x, targets=y).loss


def _smoothed(loss_fn: Callable, eps: float) -> Callable:
    """The training loss: ``loss_fn`` with ``label_smoothing=eps`` (evaluation keeps ``loss_fn`` itself)."""
    if not eps:
        return loss_fn
    import inspect

    try:
        params = inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable: no signature to read
        params = {}
    if "label_smoothing" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ValueError(f"TrainConfig.label_smoothing={eps} but loss_fn {getattr(loss_fn, '__name__', loss_fn)!r} "
                         "takes no label_smoothing keyword: add a `label_smoothing: float = 0.0` parameter to it "
                         "(evaluation calls it without one), or set label_smoothing=0")
    return lambda model, batch: loss_fn(model, batch, label_smoothing=eps)


def count_tokens(batch) -> int:
    """Tokens in a batch: elements of the input ids ((x, y) -> x.size; dict -> 'input_ids')."""
    if isinstance(batch, dict):
        batch = batch.get("input_ids", next(iter(batch.values()), None))
    elif isinstance(batch, (tuple, list)):
        batch = batch[0] if batch else None
    return int(getattr(batch, "size", 0) or 0)


def validation_loss(model, batches, loss_fn=None) -> float:
    """Mean loss per token (nats/token) of ``model`` over ``batches``: the one validation loss.

    ``batches`` is any iterable of batches (``data.eval_batches`` for the windows of a token
    array, ``random_batches`` for batches drawn the same way every call, a lesson's own
    slices); each batch's loss counts with its number of tokens (``count_tokens``). The model
    runs in eval mode (no dropout) without a graph, and is put back in the mode it was in.
    """
    loss_fn = loss_fn or default_loss_fn
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        with no_grad():
            for batch in batches:
                k = count_tokens(batch) or 1
                total += float(loss_fn(model, batch).item()) * k
                n += k
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("validation_loss got no batches; give at least one (x, y) batch")
    return total / n


def random_batches(get_batch, num_batches: int, seed: int):
    """``num_batches`` batches ``get_batch(rng)`` from a fresh Generator(seed): the same batches every call."""
    rng = np.random.default_rng(seed)
    return (get_batch(rng) for _ in range(num_batches))


def _scalar_loss(loss) -> Tensor:
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss_fn must return a minipeft Tensor, got {type(loss).__name__}")
    if loss.size != 1:
        raise ValueError(f"loss must be a scalar, got shape {loss.shape}")
    return loss


def _restore_cpu_rng(state: dict) -> None:
    """Put minipeft.random's CPU stream back without resetting other devices' generators."""
    if mp_random.get_state()["seed"] != state["seed"]:  # eval_fn reseeded: restore everything
        mp_random.set_state(state)
    else:
        mp_random.generator("cpu").bit_generator.state = state["cpu"]


def _progress_bar(config: TrainConfig, start: int):
    if not config.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.max_steps, initial=start, desc=config.run_name, unit="step", dynamic_ncols=True,
                file=sys.stderr, leave=True)


def _restore(resume, config, model, optimizer, scheduler, rng) -> tuple[int, dict | None]:
    if resume is True or resume == "auto":
        if not config.checkpoint_dir:
            raise ValueError("resume needs config.checkpoint_dir (where to look for checkpoints)")
        for _, path in reversed(ckpt.list_checkpoints(config.checkpoint_dir)):  # newest first
            try:
                return _load(path, config, model, optimizer, scheduler, rng)
            except (ckpt.DamagedFileError, FileNotFoundError) as e:  # nothing was changed: try an older one
                warnings.warn(f"resume: skipping checkpoint {path}, which is damaged or incomplete ({e})",
                              stacklevel=3)
        if resume == "auto":
            return 0, None
        root = Path(config.checkpoint_dir)
        what = "does not exist" if not root.exists() else "holds no intact step_XXXXXXXX checkpoint"
        raise FileNotFoundError(f"cannot resume: checkpoint_dir {str(root)!r} {what}; "
                                "train without resume=True first (or pass resume='auto')")
    return _load(Path(resume), config, model, optimizer, scheduler, rng)


def _load(path, config, model, optimizer, scheduler, rng) -> tuple[int, dict]:
    """Restore the checkpoint at ``path`` (model, optimizer, scheduler, generators); (step, extra)."""
    state = ckpt.read_state(path)
    saved = state["extra"].get("config", {})
    diff = [f"{k}: checkpoint {saved[k]!r} vs now {getattr(config, k)!r}" for k in _TRAJECTORY_FIELDS
            if k in saved and saved[k] != getattr(config, k)]
    if diff:
        raise ValueError(f"cannot resume from {str(path)!r} with a different config (the trajectory would "
                         f"differ): {diff}")
    state = ckpt.load_checkpoint(path, model, optimizer, scheduler, rng_state={"batch": rng})
    return int(state["step"]), state["extra"]


def _warn_if_not_empty(config) -> None:
    """A fresh run into a directory that holds another run's checkpoints: say so (resume would mix them)."""
    if config.checkpoint_dir and config.checkpoint_every:
        old = ckpt.list_checkpoints(config.checkpoint_dir)
        if old:
            warnings.warn(f"checkpoint_dir {config.checkpoint_dir!r} already holds checkpoints of another run "
                          f"(steps {[s for s, _ in old][-3:]}); this fresh run (resume=False) writes beside "
                          f"them, and a later resume='auto' would continue from the newest of all. Use an "
                          f"empty checkpoint_dir, or resume='auto' to continue that run", stacklevel=3)


def _data_parallel(parallel, model, optimizer):
    """The ``DataParallel`` this run uses (set up on ``model``/``optimizer``), or None for one process."""
    if parallel is False:
        return None
    if parallel is None:
        from .distributed import auto_data_parallel

        parallel = auto_data_parallel()
        if parallel is None:
            return None
    parallel.setup(model, optimizer)
    return parallel


def train(model, get_batch: Callable, optimizer: Optimizer | None = None, config: TrainConfig | None = None,
          eval_fn: Callable | None = None, loss_fn: Callable | None = None,
          callbacks: Sequence[Callable] = (), get_eval_batch: Callable | None = None,
          resume: bool | str = False, parallel=None) -> TrainResult:
    """Train ``model`` for ``config.max_steps`` optimizer steps; return a ``TrainResult``.

    ``get_batch(rng)`` returns a batch (``(x, y)`` by default) drawn with the trainer's
    ``numpy.random.Generator``. ``optimizer``: default ``AdamW`` over the trainable
    parameters with ``config.weight_decay``; its ``lr`` is set by the schedule.
    ``loss_fn(model, batch) -> scalar Tensor`` (default ``model(x, targets=y).loss``).
    With ``config.label_smoothing`` > 0 training calls ``loss_fn(model, batch, label_smoothing=eps)``;
    evaluation always calls ``loss_fn(model, batch)`` (plain cross-entropy).
    ``eval_fn(model) -> float | dict`` and/or ``get_eval_batch(rng)`` (mean loss over
    ``config.eval_batches`` fixed batches) run every ``eval_every`` steps and at the end.
    ``callbacks``: ``cb(step, info) -> bool|None`` after every step; ``True`` stops training
    (``EarlyStopping`` is one).
    ``resume``: ``True`` continues from the newest intact checkpoint in ``config.checkpoint_dir``
    (error if none), ``'auto'`` does so if one exists, a path resumes from that checkpoint.
    Damaged or incomplete checkpoints are skipped with a warning (``True``/``'auto'``); a fresh
    run (``resume=False``) into a directory that already holds checkpoints warns.
    Seeds ``minipeft.random`` with ``config.seed`` (the dropout stream) at the start.
    ``parallel``: a ``minipeft.distributed.DataParallel`` (data parallel, ZeRO stages 0-3); ``None``
    makes one when this process is one of several ranks (``python -m minipeft.launch``), ``False``
    never does. Each rank trains on its shard of the global batch; rank 0 prints and checkpoints.
    """
    config = config or TrainConfig()
    if not callable(get_batch):
        raise TypeError(f"get_batch must be a callable get_batch(rng) -> batch, got {type(get_batch).__name__}")
    loss_fn = loss_fn or default_loss_fn  # evaluation: plain cross-entropy
    train_loss_fn = _smoothed(loss_fn, config.label_smoothing)  # training: with label smoothing, if any
    optimizer = optimizer or AdamW(model, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = LRScheduler(optimizer, get_schedule(config.schedule, config.lr, config.warmup_steps,
                                                    config.max_steps, config.min_lr))
    rng = np.random.default_rng(config.seed)
    mp_random.manual_seed(config.seed)
    scaler = GradScaler(enabled=config.compute_dtype == "float16")  # float16 gradients need loss scaling
    result = TrainResult()
    start = 0
    if resume:
        start, extra = _restore(resume, config, model, optimizer, scheduler, rng)
    else:
        _warn_if_not_empty(config)
        extra = None
    dp = _data_parallel(parallel, model, optimizer)  # after the restore: ZeRO keeps its share of it
    if extra is not None:
        if "grad_scaler" in extra:
            scaler.load_state_dict(extra["grad_scaler"])
        result.resumed_from = start
        result.history = [StepRecord(*h) for h in extra.get("history", [])]
        result.eval_history = [(int(s), dict(m)) for s, m in extra.get("eval_history", [])]
        result.grad_norms = list(extra.get("grad_norms", []))
        result.step_times = list(extra.get("step_times", []))

    def run_eval(step: int) -> None:
        if eval_fn is None and get_eval_batch is None:
            return
        rng_state = mp_random.get_state()  # eval must not shift the dropout stream training sees
        model.eval()
        metrics: dict = {}
        with no_grad(), (dp.full_parameters() if dp else contextlib.nullcontext()):
            if get_eval_batch is not None:
                metrics["val_loss"] = validation_loss(
                    model, random_batches(get_eval_batch, max(1, config.eval_batches), config.seed + 1), loss_fn)
            if eval_fn is not None:
                out = eval_fn(model)
                metrics.update(out if isinstance(out, dict) else {"val_loss": float(out)})
        model.train()
        _restore_cpu_rng(rng_state)
        result.eval_history.append((step, metrics))
        if bar is not None:
            bar.write(f"[{config.run_name}] step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def save(step: int) -> None:
        extra = {"config": dataclasses.asdict(config), "history": [list(h) for h in result.history],
                 "eval_history": [[s, m] for s, m in result.eval_history], "grad_norms": result.grad_norms,
                 "step_times": result.step_times, "grad_scaler": scaler.state_dict()}
        write = dp.save_checkpoint if dp else ckpt.save_checkpoint  # data parallel: rank 0 writes the whole state
        write(ckpt.checkpoint_path(config.checkpoint_dir, step), model, optimizer, scheduler,
              step=step, extra=extra, rng_state={"batch": rng})
        if dp and dp.rank != 0:
            return
        if config.keep_checkpoints is not None:
            for _, old in ckpt.list_checkpoints(config.checkpoint_dir)[:-config.keep_checkpoints]:
                ckpt.remove_checkpoint(old)

    n_before = len(result.step_times)
    bar = _progress_bar(config, start) if not dp or dp.rank == 0 else None
    model.train()
    t_start = time.perf_counter()
    step = start
    try:
        while step < config.max_steps:
            t0 = time.perf_counter()
            lr = optimizer.lr
            (dp or optimizer).zero_grad()
            if dp:
                dp.gather_parameters()  # ZeRO-3: the weights other ranks own, for this step
            losses, tokens = [], 0
            n_parts = config.grad_accum_steps * (dp.num_shards if dp else 1)
            for i in range(config.grad_accum_steps):
                batch = get_batch(rng)  # data parallel: every rank draws the same global batch ...
                tokens += count_tokens(batch)
                last = i == config.grad_accum_steps - 1  # its backward may start reducing gradients (overlap)
                for part in (dp.local_shards(batch, last) if dp else (batch,)):  # ... and trains on its shard
                    with autocast(config.compute_dtype):  # backward runs in the precision each op recorded
                        loss = _scalar_loss(train_loss_fn(model, part))
                    xp = xp_of(loss.data)
                    loss.backward(xp.full(loss.shape, scaler.scale / n_parts, dtype=loss.dtype))
                    losses.append(float(loss.item()))
            if dp:
                dp.reduce_gradients()  # bucketed all-reduce (ZeRO-2/3: to each owner); overlap began some in backward
                losses = dp.gather_losses(losses, config.grad_accum_steps)  # every shard's, in one order
            train_loss = sum(losses) / n_parts
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"training loss became {train_loss} at step {step + 1}: lower lr "
                                         f"(now {lr:g}) or set grad_clip")
            # float16: an overflow skips this update (on every rank)
            found_inf = dp.unscale_(scaler) if dp else scaler.unscale_(optimizer.params)
            if not found_inf and config.grad_clip is not None:
                result.grad_norms.append(dp.clip_grad_norm_(config.grad_clip) if dp
                                         else clip_grad_norm_(optimizer.params, config.grad_clip))
            if dp:
                dp.finish_step(optimizer, update=not found_inf)  # ZeRO: owners update, then share weights
            elif not found_inf:
                optimizer.step()
            scaler.update(found_inf)
            result.skipped_steps = scaler.skipped_steps
            scheduler.step()
            step += 1
            dt = time.perf_counter() - t0
            result.step_times.append(dt)
            result.history.append(StepRecord(step, train_loss, lr, tokens / dt if dt > 0 else float("inf")))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:,.0f}")
            if config.log_every and step % config.log_every == 0:
                line = (f"[{config.run_name}] step {step:>6} | loss {train_loss:.4f} | lr {lr:.2e} | "
                        f"{tokens / dt:,.0f} tok/s")
                if not dp or dp.rank == 0:
                    (bar.write if bar is not None else print)(line)
            if (config.eval_every and step % config.eval_every == 0) or step == config.max_steps:
                run_eval(step)
            if config.checkpoint_dir and ((config.checkpoint_every and step % config.checkpoint_every == 0)
                                          or (config.checkpoint_every and step == config.max_steps)):
                save(step)
            info = {"loss": train_loss, "lr": lr, "model": model, "optimizer": optimizer, "result": result}
            with dp.full_parameters() if dp and callbacks else contextlib.nullcontext():  # ZeRO-3: all weights
                stop = any(cb(step, info) is True for cb in callbacks)
            if stop:
                break
    finally:
        if bar is not None:
            bar.close()
    result.wall_time = time.perf_counter() - t_start
    new_times = result.step_times[n_before:]
    new_steps = result.history[n_before:]
    result.final = {
        "steps": step,
        "train_loss": result.history[-1].train_loss if result.history else float("nan"),
        "tokens_per_sec": float(np.median([h.tokens_per_sec for h in new_steps])) if new_steps else float("nan"),
        "sec_per_step": float(np.median(new_times)) if new_times else float("nan"),
        "skipped_steps": result.skipped_steps,
        **(result.eval_history[-1][1] if result.eval_history else {}),
    }
    return result
