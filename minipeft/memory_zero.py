"""ZeRO's arithmetic: model-state bytes per device and bytes moved per step, for stages 0-3.

Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models", Sec. 5.1 and Fig. 1. Mixed-precision Adam keeps, per parameter, 2 bytes of fp16
weight, 2 bytes of fp16 gradient and K = 12 bytes of optimizer state (fp32 master weight,
momentum, variance). With Ψ parameters over N_d data-parallel devices, each device holds

    stage 0 (DP)       (2 + 2 + K) Ψ
    stage 1  P_os       2Ψ + 2Ψ + KΨ / N_d
    stage 2  P_os+g     2Ψ + (2 + K) Ψ / N_d
    stage 3  P_os+g+p   (2 + 2 + K) Ψ / N_d

(Fig. 1: Ψ = 7.5B, N_d = 64: 120 GB, 31.4 GB, 16.6 GB, 1.9 GB). Communication per step and
device (Sec. 7.2-7.3, ring collectives, counted in elements): DP all-reduces the gradients,
a reduce-scatter plus an all-gather, 2Ψ; stages 1 and 2 replace it by a reduce-scatter of
the gradients and an all-gather of the updated weights, 2Ψ again; stage 3 all-gathers the
weights once for forward and once for backward, 3Ψ in all (1.5x DP).

Two views are given. ``zero_model_states`` is the paper's formula with the paper's even
split Ψ/N_d. ``per_rank_bytes`` predicts what one rank of ``minipeft.distributed`` holds:
it partitions whole parameters (``distributed.buckets.partition``), so rank r holds Ψ_r of
them, and it partitions only trainable ones (frozen weights stay whole); with PEFT that makes
the frozen base the part ZeRO does not touch. ``zero_breakdown`` applies the stages to a
``minipeft.memory`` breakdown, so ZeRO and PEFT stand side by side in one vocabulary.
"""
from __future__ import annotations

import math

from .optim.adamw8bit import MIN_8BIT_SIZE, STATE_BLOCKSIZE

STAGES = (0, 1, 2, 3)
STAGE_NAMES = {0: "DP", 1: "P_os", 2: "P_os+g", 3: "P_os+g+p"}
PAPER_K = 12  # mixed-precision Adam: fp32 master weight + momentum + variance, bytes per parameter
PAPER_FIG1 = {"psi": 7.5e9, "n_d": 64, "gb": {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}}  # ZeRO paper, Fig. 1


def _check(stage: int, n_d: int) -> None:
    if stage not in STAGES:
        raise ValueError(f"ZeRO stage must be one of {STAGES}, got {stage!r}")
    if not isinstance(n_d, int) or n_d < 1:
        raise ValueError(f"n_d (data-parallel devices) must be a positive integer, got {n_d!r}")


def zero_model_states(psi: float, n_d: int, stage: int, weight_bytes: float = 2, grad_bytes: float = 2,
                      k: float = PAPER_K) -> dict:
    """The paper's per-device bytes of weights, gradients and optimizer state at ``stage``."""
    _check(stage, n_d)
    w = weight_bytes * psi / (n_d if stage >= 3 else 1)
    g = grad_bytes * psi / (n_d if stage >= 2 else 1)
    o = k * psi / (n_d if stage >= 1 else 1)
    return {"weights": w, "gradients": g, "optimizer_state": o, "total": w + g + o}


def communication_elements(psi: float, stage: int) -> float:
    """Elements each device sends (and receives) per step, ring collectives (paper Sec. 7): 2Ψ or 3Ψ."""
    _check(stage, 1)
    return (3 if stage == 3 else 2) * psi


def communication_bytes(psi: float, stage: int, n_d: int, element_bytes: float = 2) -> float:
    """Bytes each device sends per step: a ring moves (N_d - 1)/N_d of each collective's buffer."""
    _check(stage, n_d)
    return communication_elements(psi, stage) * element_bytes * (n_d - 1) / n_d


def devices_needed(psi: float, stage: int, device_bytes: float, k: float = PAPER_K) -> int | None:
    """The fewest devices whose memory holds the model states at ``stage`` (None: no count is enough)."""
    fixed = {0: 2 + 2 + k, 1: 2 + 2, 2: 2, 3: 0}[stage] * psi  # what does not shrink with N_d
    split = {0: 0, 1: k, 2: 2 + k, 3: 2 + 2 + k}[stage] * psi
    if fixed >= device_bytes:
        return None
    return max(1, math.ceil(split / (device_bytes - fixed)))


def optimizer_state_bytes(sizes, optimizer: str = "adamw", state_bytes: int = 4) -> int:
    """Bytes of state ``optimizer`` keeps for tensors of ``sizes`` elements (minipeft's optimizers).

    adamw / paged_adamw: two moments; adamw8bit: uint8 moments and a float32 absmax per 256
    values for each, 32-bit moments for tensors under 4096 elements (bitsandbytes' rule).
    """
    if optimizer in ("adamw", "paged_adamw"):
        return sum(2 * state_bytes * n for n in sizes)
    if optimizer == "adamw8bit":
        return sum(8 * n if n < MIN_8BIT_SIZE else 2 * n + 8 * -(-n // STATE_BLOCKSIZE) for n in sizes)
    raise ValueError(f"optimizer must be adamw, adamw8bit or paged_adamw, got {optimizer!r}")


def per_rank_bytes(sizes: dict[str, int], owner: dict[str, int], rank: int, stage: int, weight_bytes: int = 4,
                   grad_bytes: int = 4, optimizer: str = "adamw") -> dict:
    """What rank ``rank`` of ``minipeft.distributed`` holds between steps at ``stage`` (trainable part).

    ``sizes``: trainable parameter name -> elements; ``owner``: name -> rank (the partition).
    """
    _check(stage, max(owner.values(), default=0) + 1)
    mine = [n for name, n in sizes.items() if owner[name] == rank]
    every = list(sizes.values())
    return {"weights": weight_bytes * sum(mine if stage >= 3 else every),
            "gradients": grad_bytes * sum(mine if stage >= 2 else every),
            "optimizer_state": optimizer_state_bytes(mine if stage >= 1 else every, optimizer)}


def zero_breakdown(b, n_d: int, stage: int, partition_frozen: bool = False) -> dict:
    """A ``minipeft.memory.Breakdown``'s model states per device under ZeRO ``stage``.

    Trainable weights, gradients and optimizer state shrink as in the paper; frozen weights
    (and quantization constants) shrink at stage 3 only with ``partition_frozen`` (DeepSpeed
    does; ``minipeft.distributed`` does not). Activations are left out: ZeRO-DP does not touch them.
    """
    _check(stage, n_d)
    frozen = b.weights_frozen + b.quant_constants
    out = {"weights_trainable": b.weights_trainable / (n_d if stage >= 3 else 1),
           "weights_frozen": frozen / (n_d if stage >= 3 and partition_frozen else 1),
           "gradients": b.gradients / (n_d if stage >= 2 else 1),
           "optimizer_state": b.optimizer_state / (n_d if stage >= 1 else 1)}
    out["total"] = sum(out.values())
    return out
