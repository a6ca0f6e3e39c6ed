"""Optimizers: what updates the trainable parameters, and what that costs in memory.

core        Optimizer base, SGD, AdamW (``adamw_update``, ``sgd_update``), clip_grad_norm_
schedules   constant / linear / cosine learning-rate schedules with warmup, LRScheduler
adamw8bit   AdamW8bit: both moments block-wise quantized to 8 bits (bitsandbytes)
paged       PagedAdamW: state in host memory, moved to the device page by page
"""
from .adamw8bit import AdamW8bit
from .core import SGD, AdamW, Optimizer, adamw_update, clip_grad_norm_, sgd_update
from .paged import PagedAdamW
from .schedules import (SCHEDULES, LRScheduler, constant_schedule, cosine_schedule, get_schedule,
                        linear_schedule)

__all__ = [
    "Optimizer", "SGD", "AdamW", "AdamW8bit", "PagedAdamW", "adamw_update", "sgd_update",
    "clip_grad_norm_", "SCHEDULES", "LRScheduler", "constant_schedule", "linear_schedule",
    "cosine_schedule", "get_schedule",
]
