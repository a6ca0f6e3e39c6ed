"""Early stopping as a ``train()`` callback: stop once the validation loss stops improving,
and optionally put back the weights of the best evaluation (the selected checkpoint).
"""
from __future__ import annotations

import math

import numpy as np


class EarlyStopping:
    """A ``train()`` callback: stop once ``patience`` evaluations in a row did not beat the best one.

    Only evaluations at steps ``>= min_step`` count, for the best as for the patience: with
    ``min_step`` = the warm-up steps, early stopping cannot fire (nor pick a checkpoint) while
    the learning rate is still rising, where a flat loss means a small step, not a finished
    run. An evaluation beats the best when ``metric`` falls by more than ``min_delta``. With
    ``keep_best`` the trainable weights of the best evaluation are copied, and
    ``restore_best(model)`` puts them back after training: the model then is the checkpoint
    that early stopping selected. ``stopped_at`` is the step training stopped at (None: ran out).

    The metric should come from a validation slice that is not the one you report: selecting
    the step on the reported slice biases the reported number downward. It keeps state:
    use one instance per ``train()`` run.
    """

    def __init__(self, patience: int, min_step: int = 0, metric: str = "val_loss", min_delta: float = 0.0,
                 keep_best: bool = False):
        if isinstance(patience, bool) or not isinstance(patience, (int, np.integer)) or patience < 1:
            raise ValueError(f"EarlyStopping.patience must be a positive integer (evaluations without "
                             f"improvement before stopping), got {patience!r}")
        if isinstance(min_step, bool) or not isinstance(min_step, (int, np.integer)) or min_step < 0:
            raise ValueError(f"EarlyStopping.min_step must be a non-negative integer (e.g. the warm-up steps), "
                             f"got {min_step!r}")
        if not min_delta >= 0:
            raise ValueError(f"EarlyStopping.min_delta must be >= 0, got {min_delta!r}")
        self.patience, self.min_step, self.metric = int(patience), int(min_step), metric
        self.min_delta, self.keep_best = float(min_delta), keep_best
        self.best: float = math.inf  # best metric among the counted evaluations
        self.best_step: int | None = None  # the step of that evaluation (the selected checkpoint)
        self.bad_evals = 0  # counted evaluations since the best
        self.stopped_at: int | None = None
        self._best_state: dict | None = None

    def __call__(self, step: int, info: dict) -> bool | None:
        hist = info["result"].eval_history
        if not hist or hist[-1][0] != step or step < self.min_step:
            return None  # no evaluation at this step, or one inside warm-up: it does not count
        metrics = hist[-1][1]
        if self.metric not in metrics:
            raise KeyError(f"EarlyStopping watches {self.metric!r} but the evaluation at step {step} returned "
                           f"{sorted(metrics)}; pass metric= one of those")
        value = float(metrics[self.metric])
        if value < self.best - self.min_delta:
            self.best, self.best_step, self.bad_evals = value, step, 0
            if self.keep_best:
                self._best_state = {n: p.data.copy() for n, p in info["model"].named_parameters() if p.requires_grad}
        else:
            self.bad_evals += 1  # NaN never improves
        if self.bad_evals >= self.patience:
            self.stopped_at = step
            return True
        return None

    def restore_best(self, model) -> int:
        """Put the best evaluation's trainable weights back into ``model``; return its step."""
        if not self.keep_best:
            raise ValueError("restore_best needs EarlyStopping(keep_best=True)")
        if self._best_state is None:
            raise ValueError(f"no evaluation at step >= min_step ({self.min_step}) was seen: evaluate after the "
                             "warm-up (eval_every, max_steps) or lower min_step")
        params = dict(model.named_parameters())
        for name, data in self._best_state.items():
            params[name].data[...] = data
        return self.best_step
