"""Optimizers: what updates the trainable parameters, and what that costs in memory.

core        Optimizer base, SGD, AdamW (``adamw_update``, ``sgd_update``), clip_grad_norm_
schedules   constant / linear / cosine learning-rate schedules with warmup, LRScheduler
state8bit   the 8-bit block-wise state (dynamic maps, absmax per 256) AdamW8bit and Lion8bit share
adamw8bit   AdamW8bit: both moments block-wise quantized to 8 bits (bitsandbytes' CUDA kernel)
lion        Lion and Lion8bit: sign of the interpolated momentum (Chen et al. 2023), 32- and 8-bit state
paged       PagedAdamW: state in host memory, moved to the device page by page
paged8bit   PagedAdamW8bit: AdamW8bit's uint8 states and absmax, paged as PagedAdamW's
"""
from .adamw8bit import AdamW8bit
from .core import SGD, AdamW, Optimizer, adamw_update, clip_grad_norm_, sgd_update
from .lion import Lion, Lion8bit
from .paged import PagedAdamW
from .paged8bit import PagedAdamW8bit
from .schedules import (SCHEDULES, LRScheduler, constant_schedule, cosine_schedule, get_schedule,
                        linear_schedule)

__all__ = [
    "Optimizer", "SGD", "AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "Lion", "Lion8bit",
    "adamw_update", "sgd_update",
    "clip_grad_norm_", "SCHEDULES", "LRScheduler", "constant_schedule", "linear_schedule",
    "cosine_schedule", "get_schedule",
]
