"""Section 5 of the LoRA lesson: merging two adapters, by each of peft's combination types.

Two LoRA adapters of the same rank on the same base, one fine-tuned on Python code and one
on C code, become one adapter with ``add_weighted_adapter`` (minipeft.peft.merge, peft's
semantics) and weights (1, 1): task arithmetic (Ilharco et al. 2023) adds the two updates.
For each combination type the merged adapter's validation loss on both tasks is measured:

* ``cat`` and ``svd`` (at rank 2r) add the two ΔW exactly; ``svd`` at the default rank r
  keeps the best rank-r part of the sum;
* ``linear`` and its kin combine the factors A and B separately, so ΔW gains the cross
  terms B_python A_C and B_C A_python;
* ``ties`` / ``magnitude_prune`` trim each task tensor to its largest ``density`` share,
  ``dare_*`` drop a random 1 - density share and rescale the rest (seeded), and the TIES
  types keep, per entry, only the adapters that agree with the elected sign.
"""
from __future__ import annotations

import copy

from .. import pretrained
from ..peft.merge import COMBINATIONS

WEIGHTS = (1.0, 1.0)  # task arithmetic: ΔW_python + ΔW_C
DENSITY = 0.5  # the share of entries TIES, DARE and magnitude pruning keep


def merge_study(python_model, c_model, val_tokens: dict, s: dict, seed: int) -> dict:
    """Validation losses ({task: loss}) of each adapter alone and of their merge by every combination type.

    ``python_model``, ``c_model``: PeftModels of one config on copies of one base (adapter "default").
    """
    model = copy.deepcopy(python_model)
    model.add_adapter("c", c_model.peft_config["default"])
    model.load_peft_state_dict(c_model.peft_state_dict("default"), "c")

    def losses() -> dict:
        return {task: pretrained.validation_loss(model, tok, s["block"], batch_size=8, max_batches=s["val_batches"])
                for task, tok in val_tokens.items()}

    alone = {}
    for name, label in (("default", "python"), ("c", "c")):
        model.set_adapter(name)
        alone[label] = losses()
    merged = {}
    for t in COMBINATIONS:
        model.add_weighted_adapter(["default", "c"], list(WEIGHTS), t, combination_type=t, density=DENSITY, seed=seed)
        model.set_adapter(t)
        merged[t] = dict(losses(), r=model.peft_config[t].r)
        model.set_adapter("default")
        model.delete_adapter(t)
    return dict(alone=alone, merged=merged, weights=list(WEIGHTS), density=DENSITY)


def report_merges(rep, study: dict, base_losses: dict) -> None:
    tasks = list(base_losses)
    rows = [("base (no adapter)", "-", *(f"{base_losses[t]:.3f}" for t in tasks))]
    rows += [(f"{label} adapter alone", "", *(f"{v[t]:.3f}" for t in tasks)) for label, v in study["alone"].items()]
    rows += [(t, v["r"], *(f"{v[t]:.3f}" for t in tasks)) for t, v in study["merged"].items()]
    rep.table(rows, ("adapter", "rank", *(f"val loss: {t}" for t in tasks)))
    best = min(study["merged"], key=lambda t: sum(study["merged"][t][k] for k in tasks))
    m = study["merged"]
    rep.text(f"weights {tuple(study['weights'])}, density {study['density']}. Best on both tasks together: {best}. "
             f"cat (rank {m['cat']['r']}) adds the two updates exactly; svd keeps the best rank-{m['svd']['r']} part "
             "of that sum; linear mixes the factors, so its update has cross terms between the two adapters.")
