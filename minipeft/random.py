"""The engine's random numbers: one seed, one generator per backend, state you can save.

Dropout and initialization draw from here unless given a ``numpy.random.Generator``.
``manual_seed(s)`` makes a CPU run repeat exactly; ``get_state()``/``set_state()`` let a
checkpoint resume with the very same random stream.
"""
from __future__ import annotations

import contextlib

import numpy as np

from .backend import get_xp

_seed = 0
_generators: dict[str, object] = {}


def manual_seed(seed: int) -> None:
    """Reset every backend's generator to ``seed``."""
    global _seed
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    _seed = int(seed)
    _generators.clear()


def generator(device: str = "cpu"):
    """The shared Generator for ``device`` ('cpu' -> numpy, 'cuda' -> cupy)."""
    if device not in _generators:
        xp = get_xp(device)
        _generators[device] = xp.random.default_rng(_seed) if device == "cpu" else xp.random.default_rng(_seed)
    return _generators[device]


def get_state() -> dict:
    """JSON-able state of the CPU generator (the one CPU resume depends on)."""
    return {"seed": _seed, "cpu": generator("cpu").bit_generator.state}


def set_state(state: dict) -> None:
    manual_seed(int(state["seed"]))
    generator("cpu").bit_generator.state = state["cpu"]


@contextlib.contextmanager
def fork(seed: int):
    """Inside, every backend draws from a stream seeded with ``seed``; after, the previous streams go on.

    Data parallelism gives each shard of a batch its own dropout stream this way, so a mask
    depends on the shard, not on which rank (or how many) computed it.
    """
    global _seed
    saved_seed, saved = _seed, dict(_generators)
    manual_seed(seed)
    try:
        yield
    finally:
        _seed = saved_seed
        _generators.clear()
        _generators.update(saved)
