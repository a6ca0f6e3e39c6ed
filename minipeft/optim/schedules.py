"""Learning-rate schedules and the scheduler that applies one to an optimizer.

Schedules ``lr(step) -> float`` with linear warmup, as Hugging Face's
``get_{constant,linear,cosine}_schedule_with_warmup`` (``step`` counts optimizer steps
already taken, so the first step with warmup uses lr 0 just as there), plus an optional
floor ``min_lr``; the cosine one is SGDR's half cosine (Loshchilov & Hutter 2017, Eq. 5)
without restarts. ``LRScheduler`` applies one to an optimizer and has state.
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # pragma: no cover
    from .core import Optimizer



def _warmup(step: int, warmup_steps: int) -> float | None:
    return step / max(1, warmup_steps) if step < warmup_steps else None


def _constant(step: int, *, lr: float, warmup_steps: int) -> float:
    w = _warmup(step, warmup_steps)
    return lr * (1.0 if w is None else w)


def _linear(step: int, *, lr: float, warmup_steps: int, total_steps: int, min_lr: float) -> float:
    w = _warmup(step, warmup_steps)
    if w is not None:
        return lr * w
    frac = max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))  # 1 -> 0
    return min_lr + (lr - min_lr) * frac


def _cosine(step: int, *, lr: float, warmup_steps: int, total_steps: int, min_lr: float) -> float:
    w = _warmup(step, warmup_steps)
    if w is not None:
        return lr * w
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))  # 0 -> 1
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _check_schedule(lr, warmup_steps, total_steps, min_lr):
    if not lr >= 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps is not None and warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must not exceed total_steps ({total_steps})")
    if not 0 <= min_lr <= lr:
        raise ValueError(f"min_lr must be in [0, lr={lr}], got {min_lr}")


def constant_schedule(lr: float, warmup_steps: int = 0) -> Callable[[int], float]:
    """lr(step): linear warmup from 0, then constant ``lr``."""
    _check_schedule(lr, warmup_steps, None, 0.0)
    return functools.partial(_constant, lr=float(lr), warmup_steps=int(warmup_steps))


def linear_schedule(lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> Callable[[int], float]:
    """lr(step): warmup, then linear decay to ``min_lr`` at ``total_steps``."""
    _check_schedule(lr, warmup_steps, total_steps, min_lr)
    return functools.partial(_linear, lr=float(lr), warmup_steps=int(warmup_steps),
                             total_steps=int(total_steps), min_lr=float(min_lr))


def cosine_schedule(lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> Callable[[int], float]:
    """lr(step): warmup, then half a cosine down to ``min_lr`` at ``total_steps`` (SGDR, Loshchilov & Hutter 2017)."""
    _check_schedule(lr, warmup_steps, total_steps, min_lr)
    return functools.partial(_cosine, lr=float(lr), warmup_steps=int(warmup_steps),
                             total_steps=int(total_steps), min_lr=float(min_lr))


SCHEDULES = ("constant", "linear", "cosine")


def get_schedule(name: str, lr: float, warmup_steps: int = 0, total_steps: int | None = None,
                 min_lr: float = 0.0) -> Callable[[int], float]:
    """A schedule by name: 'constant', 'linear' or 'cosine' (the latter two need ``total_steps``)."""
    if name == "constant":
        return constant_schedule(lr, warmup_steps)
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}: expected one of {SCHEDULES}")
    if total_steps is None:
        raise ValueError(f"schedule {name!r} needs total_steps")
    fn = linear_schedule if name == "linear" else cosine_schedule
    return fn(lr, warmup_steps, total_steps, min_lr)


class LRScheduler:
    """Sets ``optimizer.lr = schedule(t)`` where ``t`` counts ``step()`` calls so far.

    Call ``scheduler.step()`` after each ``optimizer.step()`` (PyTorch's order).
    """

    def __init__(self, optimizer: Optimizer, schedule: Callable[[int], float]):
        if not callable(schedule):
            raise TypeError(f"schedule must be a callable lr(step) -> float, got {type(schedule).__name__}")
        self.optimizer, self.schedule = optimizer, schedule
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        self.optimizer.lr = float(self.schedule(self.last_step))

    def get_lr(self) -> float:
        return self.optimizer.lr

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, sd: dict) -> None:
        if "last_step" not in sd:
            raise ValueError(f"scheduler state needs 'last_step', got keys {sorted(sd)}")
        self.last_step = int(sd["last_step"])
        self._apply()
