"""The QLoRA lesson's studies beside its training runs: memory (section 4, 5) and merging (6).

* ``checkpointed_step``: one QLoRA training step without and with gradient checkpointing
  (Chen et al. 2016; ``minipeft.checkpointing``), saved activations measured beside the
  calculator's prediction, next to the LoRA parameters' bytes: the course's "activations
  dominate" with the lever that cuts them.
* ``optimizer_states``: full fine-tuning's optimizer state under AdamW, 8-bit AdamW and
  paged AdamW (Dettmers et al. 2022, 2023).
* ``merge_study``: the QLoRA adapter merged four ways, each scored with the lesson's loss;
  one of them is peft's merge into the NF4 layers themselves (dequantize, add s·B·A,
  quantize again: ``minipeft.quant.requantize``), whose rounding is reported.
"""
from __future__ import annotations

import copy

import numpy as np

from ..engine import no_grad
from ..memory import StepSetup, estimate_memory
from ..memory_measure import measure_training_step
from ..optim import AdamW

PAGE = 4096  # elements per page of paged optimizer state


def checkpointed_step(model, batch, config, method_config) -> dict:
    """One training step of ``model`` (in training mode) without, then with, gradient checkpointing.

    Returns bytes: the activations of each step, measured and predicted by the calculator,
    and the trainable weights (the LoRA parameters)."""
    model.train()  # checkpointing applies in training, as transformers' does
    B, T = batch[0].shape
    p = config.dropout
    out = {}
    for on, key in ((False, "activations_plain"), (True, "activations")):
        if on:
            model.gradient_checkpointing_enable()
        measured = measure_training_step(model, batch, AdamW([q for q in model.parameters() if q.requires_grad],
                                                             lr=1e-9))
        t = StepSetup(batch_size=B, seq_len=T, ledger_view=True, resid_pdrop=p, embd_pdrop=p,
                           gradient_checkpointing=on)
        out[key], out[key + "_predicted"] = measured.activations, estimate_memory(config, method_config, t).activations
    out["lora_parameters"] = measured.weights_trainable
    return out


def optimizer_states(base, batch) -> list[tuple]:
    """(optimizer, state bytes, bytes on the device at peak, note) for one full fine-tuning step.

    bitsandbytes' optimizers (arXiv 2110.02861; Lion: Chen et al. 2023, arXiv 2302.06675): AdamW keeps
    two moments, Lion one; the 8-bit ones keep them block-wise quantized; the paged ones keep them on
    the host and bring pages to the device for the update (a quarter of the state at most here).
    """
    from ..optim import AdamW8bit, Lion, Lion8bit, PagedAdamW, PagedAdamW8bit

    budget = _budget(base)
    rows = []
    for name, make in (("AdamW (32-bit)", lambda ps: AdamW(ps, lr=1e-4)),
                       ("AdamW8bit", lambda ps: AdamW8bit(ps, lr=1e-4)),
                       ("PagedAdamW", lambda ps: PagedAdamW(ps, lr=1e-4, page_size=PAGE, device_budget_bytes=budget)),
                       ("PagedAdamW8bit", lambda ps: PagedAdamW8bit(ps, lr=1e-4, page_size=PAGE,
                                                                    device_budget_bytes=budget // 4)),
                       ("Lion (32-bit)", lambda ps: Lion(ps, lr=1e-5)),
                       ("Lion8bit", lambda ps: Lion8bit(ps, lr=1e-5))):
        model = copy.deepcopy(base)
        opt = make(list(model.parameters()))
        meas = measure_training_step(model, batch, opt)
        peak, note = meas.optimizer_state, ""
        if name.startswith("Paged"):
            stats = opt.paging_stats()
            peak = stats["peak_device_bytes"]
            note = f"{stats['page_ins']} page-ins of {stats['pages']} pages; budget {stats['device_budget_bytes']:,} B"
        elif name.endswith("8bit"):
            note = "tensors < 4096 elements keep 32-bit state"
        elif name.startswith("Lion"):
            note = "one moment (AdamW keeps two)"
        rows.append((name, meas.optimizer_state, peak, note))
    return rows


def _budget(base) -> int:
    """A device budget for paged state: a quarter of what 32-bit AdamW state needs (>= 2 pages)."""
    return max(8 * base.num_parameters() // 4, 2 * 8 * PAGE)


MERGED_NF4 = "merged into the NF4 layers, re-quantized (peft's merge)"


def merge_study(qlora_model, base, loss) -> tuple[dict, float]:
    """``loss`` of the QLoRA model as trained and after each way of merging it, and the
    largest weight change re-quantizing the merged NF4 layers cost (max |stored - exact sum|)."""
    out = {"QLoRA as trained (NF4 base + LoRA)": loss(qlora_model)}
    deltas = {}
    with no_grad():
        for name, m in qlora_model.named_modules():
            if hasattr(m, "get_delta_weight") and hasattr(m, "lora_A"):
                key = name.split("base_model.model.", 1)[-1]
                deltas[key] = (m.get_delta_weight("default").data, m.base_weight())
    dequant = copy.deepcopy(base)
    original = copy.deepcopy(base)
    for key, (delta, w_nf4) in deltas.items():
        dequant.get_submodule(key).weight.data = (w_nf4 + delta).astype(np.float32)
        lin = original.get_submodule(key)
        lin.weight.data = lin.weight.data + delta
    out["merged into the dequantized NF4 base"] = loss(dequant)
    out["merged into the original fp32 base"] = loss(original)
    merged = copy.deepcopy(qlora_model)
    merged.merge_adapter()  # each Linear4bit: dequantize, add s·B·A, quantize to NF4 again
    rounding = max(m.merge_rounding for m in merged.modules() if hasattr(m, "merge_rounding"))
    out[MERGED_NF4] = loss(merged.merge_and_unload())
    out["original base (no adapter)"] = loss(base)
    return out, rounding


__all__ = ["checkpointed_step", "optimizer_states", "merge_study", "MERGED_NF4", "PAGE"]
