"""Training checkpoints: safetensors for arrays, JSON for everything else; never pickle.

A checkpoint is a directory::

    model.safetensors      model.state_dict() (parameters and extra state), as NumPy
    optimizer.safetensors  optimizer state arrays (AdamW moments, SGD momentum buffers)
    state.json             step, optimizer step counts and hyperparameters, scheduler
                           state, random-number-generator states, user ``extra``

``state.json`` is written last (atomically), so a directory without it is an
interrupted save and is refused. Restoring the RNG states as well as the weights and
optimizer is what lets a resumed CPU run repeat the uninterrupted run's losses exactly:
``numpy.random.Generator.bit_generator.state`` is a JSON-able dict, and so is
``minipeft.random.get_state()`` (the stream dropout draws from).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import random as mp_random
from .backend import to_numpy

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
FORMAT = "minipeft-checkpoint"
VERSION = 1


def _safetensors_numpy():
    try:
        from safetensors import numpy as st_numpy
    except ImportError as e:  # pragma: no cover - safetensors is a runtime dependency
        raise ImportError("checkpoints need the 'safetensors' package: pip install safetensors") from e
    return st_numpy


def _to_json_able(obj):
    """Turn NumPy arrays/scalars inside RNG states into plain JSON values (tagged arrays)."""
    if isinstance(obj, dict):
        return {k: _to_json_able(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json_able(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _from_json_able(obj):
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        return {k: _from_json_able(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json_able(v) for v in obj]
    return obj


def _rng_states(generators) -> dict:
    out = {}
    for name, g in (generators or {}).items():
        if not isinstance(g, np.random.Generator):
            raise TypeError(f"rng_state[{name!r}] must be a numpy.random.Generator, got {type(g).__name__}")
        out[name] = _to_json_able(g.bit_generator.state)
    return out


def save_checkpoint(path_dir, model, optimizer=None, scheduler=None, step: int = 0, extra: dict | None = None,
                    rng_state: dict | None = None) -> Path:
    """Write a checkpoint directory (created if needed) and return its path.

    ``rng_state``: name -> ``numpy.random.Generator`` whose states to save (e.g. the
    trainer's batch sampler); ``minipeft.random``'s state is always saved.
    ``extra``: any JSON-able dict (the training config, loss history, ...).
    """
    path = Path(path_dir)
    state = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "model_keys": [],
        "optimizer": None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": {"generators": _rng_states(rng_state), "minipeft": _to_json_able(mp_random.get_state())},
        "extra": extra if extra is not None else {},
    }
    try:
        json.dumps(state["extra"], allow_nan=True)
    except TypeError as e:
        raise TypeError(f"save_checkpoint: extra must be JSON-able (numbers, strings, lists, dicts): {e}") from e

    model_arrays = {k: np.ascontiguousarray(to_numpy(a)) for k, a in model.state_dict().items()}
    state["model_keys"] = list(model_arrays)
    opt_arrays = {}
    if optimizer is not None:
        sd = optimizer.state_dict()
        scalars, index = {}, {}
        for name, st in sd["state"].items():
            scalars[name] = {}
            for k, v in st.items():
                if hasattr(v, "shape"):
                    key = f"{name}.{k}"
                    opt_arrays[key] = np.ascontiguousarray(to_numpy(v))
                    index[key] = [name, k]
                else:
                    scalars[name][k] = v.item() if isinstance(v, np.generic) else v
        state["optimizer"] = {"type": sd["type"], "hparams": sd["hparams"], "param_names": sd["param_names"],
                              "scalars": scalars, "arrays": index}

    st_numpy = _safetensors_numpy()
    path.mkdir(parents=True, exist_ok=True)
    state_path = path / STATE_FILE
    if state_path.exists():
        state_path.unlink()  # an overwritten checkpoint is incomplete until state.json is back
    st_numpy.save_file(model_arrays, str(path / MODEL_FILE), metadata={"format": "np"})
    if optimizer is not None:
        st_numpy.save_file(opt_arrays, str(path / OPTIMIZER_FILE), metadata={"format": "np"})
    elif (path / OPTIMIZER_FILE).exists():
        (path / OPTIMIZER_FILE).unlink()
    tmp = path / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, state_path)
    return path


def read_state(path_dir) -> dict:
    """The parsed ``state.json`` of a checkpoint, with clear errors if it is not one."""
    path = Path(path_dir)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"checkpoint path {str(path)!r} is a file; expected a directory "
                                 f"holding {MODEL_FILE} and {STATE_FILE}")
    sp = path / STATE_FILE
    if not sp.exists():
        have = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(f"{str(path)!r} is not a complete checkpoint: {STATE_FILE} is missing "
                                f"(found {have}); it may be an interrupted save")
    state = json.loads(sp.read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"{str(sp)!r} is not a minipeft checkpoint (format {state.get('format')!r})")
    if state.get("version", 0) > VERSION:
        raise ValueError(f"checkpoint version {state['version']} is newer than this minipeft reads ({VERSION})")
    return state


def load_checkpoint(path_dir, model=None, optimizer=None, scheduler=None, rng_state: dict | None = None,
                    restore_rng: bool = True) -> dict:
    """Restore what was saved into the given objects; return ``state.json`` (step, extra, ...).

    ``rng_state``: name -> ``numpy.random.Generator`` whose states are set from the file.
    Nothing is changed unless every part fits: the model's keys and shapes
    (``ValueError`` from ``load_state_dict`` listing them), the optimizer's parameters
    and shapes, and the generators named.
    """
    path = Path(path_dir)
    state = read_state(path)
    st_numpy = _safetensors_numpy()

    opt_sd = None
    if optimizer is not None:
        if state["optimizer"] is None:
            raise ValueError(f"checkpoint {str(path)!r} has no optimizer state, but an optimizer was given to load")
        if not (path / OPTIMIZER_FILE).exists():
            raise FileNotFoundError(f"{str(path / OPTIMIZER_FILE)!r} is missing")
        arrays = st_numpy.load_file(str(path / OPTIMIZER_FILE))
        o = state["optimizer"]
        sd_state = {name: dict(sc) for name, sc in o["scalars"].items()}
        for key, (name, k) in o["arrays"].items():
            if key not in arrays:
                raise ValueError(f"{OPTIMIZER_FILE} lacks array {key!r} listed in {STATE_FILE}")
            sd_state.setdefault(name, {})[k] = arrays[key]
        opt_sd = {"type": o["type"], "hparams": o["hparams"], "param_names": o["param_names"], "state": sd_state}
        optimizer.check_state_dict(opt_sd)
    gens = state["rng"]["generators"]
    missing = sorted(set(rng_state or {}) - set(gens))
    if missing:
        raise ValueError(f"checkpoint has no state for generators {missing}; it saved {sorted(gens)}")
    if scheduler is not None and state["scheduler"] is None:
        raise ValueError(f"checkpoint {str(path)!r} has no scheduler state, but a scheduler was given to load")

    if model is not None:
        if not (path / MODEL_FILE).exists():
            raise FileNotFoundError(f"{str(path / MODEL_FILE)!r} is missing")
        arrays = st_numpy.load_file(str(path / MODEL_FILE))
        try:
            model.load_state_dict(arrays)
        except ValueError as e:
            raise ValueError(f"checkpoint {str(path)!r} does not fit this model: {e}") from e
    if opt_sd is not None:
        optimizer.load_state_dict(opt_sd)
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    for name, g in (rng_state or {}).items():
        g.bit_generator.state = _from_json_able(gens[name])
    if restore_rng:
        mp_random.set_state(_from_json_able(state["rng"]["minipeft"]))
    return state


def list_checkpoints(root) -> list[tuple[int, Path]]:
    """Complete checkpoints ``root/step_XXXXXXXX`` as (step, path), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and (p / STATE_FILE).exists():
            try:
                out.append((int(p.name[5:]), p))
            except ValueError:
                continue
    return sorted(out)


def latest_checkpoint(root) -> Path | None:
    """The newest complete checkpoint under ``root`` (``None`` if there is none)."""
    cks = list_checkpoints(root)
    return cks[-1][1] if cks else None


def checkpoint_path(root, step: int) -> Path:
    return Path(root) / f"step_{int(step):08d}"
