"""Memory profiling (measured): run one real training step and count what it holds.

The analytic calculator (``minipeft.memory``) predicts bytes by category; this module
measures the same categories on a real step and returns the same ``Breakdown``, so a lesson
can print them side by side:

* weights, trainable and frozen: the arrays the model's parameters hold, plus the
  non-parameter arrays of quantized layers (packed 4-bit codes are frozen weights;
  absmax values, nested absmax and code tables are quantization constants). Each
  buffer is counted once (a tied ``lm_head`` is ``wte``).
* gradients: the ``.grad`` arrays after backward.
* optimizer state: ``optimizer.state_bytes()`` after the step.
* activations: the engine's peak of bytes held for backward during the step
  (``engine.peak_saved_bytes``; what ``ctx.save_for_backward`` kept).
* on a GPU, the peak of the CuPy memory pool's allocations during the step, which
  also includes what no category above holds (temporaries of forward and backward).
"""
from __future__ import annotations

import time

from . import engine
from .backend import DeviceMemoryTracker, synchronize
from .memory import CATEGORIES, Breakdown, format_bytes


def model_bytes(model) -> dict:
    """Bytes held by a model's arrays: trainable, frozen and quantization constants."""
    seen: set[int] = set()
    out = {"weights_trainable": 0, "weights_frozen": 0, "quant_constants": 0}
    for _, p in model.named_parameters():
        if id(p.data) in seen:
            continue
        seen.add(id(p.data))
        out["weights_trainable" if p.requires_grad else "weights_frozen"] += int(p.data.nbytes)
    for _, m in model.named_modules():
        held = getattr(m, "_held_arrays", None)
        if held is None:
            continue
        # quantized layers: the first array is the stored (packed) weight, the rest are its
        # constants (absmax, nested absmax, offset, code tables), counted per layer as
        # bitsandbytes keeps them per QuantState (whether or not two layers share a table)
        for i, arr in enumerate(held()):
            out["weights_frozen" if i == 0 else "quant_constants"] += int(arr.nbytes)
    return out


def measure_training_step(model, batch, optimizer, loss_fn=None) -> Breakdown:
    """Run one step (forward, backward, optimizer step) and measure its memory by category.

    ``loss_fn(model, batch) -> scalar Tensor`` (default ``model(x, targets=y).loss``).
    Gradients are cleared before and kept after, so they can be counted.
    """
    from .train import default_loss_fn

    loss_fn = loss_fn or default_loss_fn
    model.zero_grad()
    before = model_bytes(model)
    device = model.device
    synchronize(device)
    with DeviceMemoryTracker(device) as tracker:
        engine.reset_peak_saved_bytes()
        base_saved = engine.saved_bytes()
        t0 = time.perf_counter()
        loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        synchronize(device)
        seconds = time.perf_counter() - t0
        peak_saved = engine.peak_saved_bytes() - base_saved
    grads, seen = 0, set()
    for p in model.parameters():
        if p.grad is not None and id(p.grad) not in seen:
            seen.add(id(p.grad))
            grads += int(p.grad.nbytes)
    return Breakdown(before["weights_trainable"], before["weights_frozen"], grads, int(optimizer.state_bytes()),
                     int(peak_saved), before["quant_constants"], n_params=int(model.num_parameters()),
                     n_trainable=int(model.num_parameters(trainable_only=True)),
                     device_peak=int(tracker.peak), step_seconds=seconds, loss=float(loss.item()))


def compare(predicted: Breakdown, measured: Breakdown) -> list[tuple[str, int, int, str]]:
    """Rows (category, predicted bytes, measured bytes, measured/predicted) for a report."""
    rows = []
    for name in CATEGORIES + ("total",):
        p, m = getattr(predicted, name), getattr(measured, name)
        ratio = "-" if p == 0 and m == 0 else ("inf" if p == 0 else f"{m / p:.3f}")
        rows.append((name, p, m, ratio))
    return rows


def format_comparison(rows, title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"  {'category':<18}{'predicted':>12}{'measured':>12}  measured/predicted")
    for name, p, m, r in rows:
        lines.append(f"  {name:<18}{format_bytes(p):>12}{format_bytes(m):>12}  {r:>8}")
    return "\n".join(lines)
