"""Training checkpoints: safetensors for arrays, JSON for everything else; never pickle.

A checkpoint is a directory::

    model.safetensors      model.state_dict() (parameters and extra state), as NumPy
    optimizer.safetensors  optimizer state arrays (AdamW moments, SGD momentum buffers)
    state.json             step, optimizer step counts and hyperparameters, scheduler
                           state, random-number-generator states, user ``extra``, and the
                           digest of each tensor file

The directory is written whole into a temporary directory beside it and renamed into
place (``minipeft.atomic``), so overwriting a checkpoint never leaves a mix of two saves:
a kill at any moment leaves the previous checkpoint or the new one. Loading checks that
the set is complete and belongs together -- every file present, each file's contents
matching its digest, the digests matching ``state.json``'s -- before it touches the model,
and a damaged file raises ``DamagedFileError`` naming it and the remedy.

Restoring the RNG states as well as the weights and optimizer is what lets a resumed CPU
run repeat the uninterrupted run's losses exactly: ``numpy.random.Generator.bit_generator.state``
is a JSON-able dict, and so is ``minipeft.random.get_state()`` (the stream dropout draws from).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import random as mp_random
from .atomic import atomic_directory, recover, remove_directory
from .backend import to_numpy
from .integrity import DamagedFileError, DIGEST_KEY, dumps_with_digest, load_tensors, read_json, save_tensors

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
FORMAT = "minipeft-checkpoint"
VERSION = 1


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

    with atomic_directory(path, owned=(MODEL_FILE, OPTIMIZER_FILE, STATE_FILE)) as tmp:
        files = {MODEL_FILE: save_tensors(model_arrays, tmp / MODEL_FILE, {"format": "np"})}
        if optimizer is not None:
            files[OPTIMIZER_FILE] = save_tensors(opt_arrays, tmp / OPTIMIZER_FILE, {"format": "np"})
        state["files"] = files  # the digest of each tensor file: the set must belong together
        (tmp / STATE_FILE).write_text(dumps_with_digest(state))
    return path


def _remedy(path: Path) -> str:
    return (f"Delete {path} and rerun (train(resume='auto') skips it and resumes from the newest intact "
            f"checkpoint)")


def read_state(path_dir) -> dict:
    """The parsed ``state.json`` of a checkpoint, with clear errors if it is not one or is damaged."""
    path = Path(path_dir)
    recover(path)  # a save killed between its two renames left the previous checkpoint aside
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"checkpoint path {str(path)!r} is a file; expected a directory "
                                 f"holding {MODEL_FILE} and {STATE_FILE}")
    sp = path / STATE_FILE
    if not sp.exists():
        have = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(f"{str(path)!r} is not a complete checkpoint: {STATE_FILE} is missing "
                                f"(found {have}); it may be an interrupted save. {_remedy(path)}")
    state = read_json(sp, _remedy(path))
    if state.get("format") != FORMAT:
        raise DamagedFileError(sp, f"not a minipeft checkpoint (format {state.get('format')!r})", _remedy(path))
    if not isinstance(state.get("version"), int) or state["version"] > VERSION:
        raise ValueError(f"{sp}: checkpoint version {state.get('version')!r} is not one this minipeft reads "
                         f"(up to {VERSION}); upgrade minipeft")
    want = {"step": int, "model_keys": list, "rng": dict, "extra": dict}
    bad = [k for k, t in want.items() if not isinstance(state.get(k), t)]
    if bad:
        raise DamagedFileError(sp, f"fields {bad} are missing or of the wrong type", _remedy(path))
    return state


def _read_arrays(path: Path, name: str, state: dict) -> dict:
    """The arrays of ``path/name``, checked against their digest and against ``state.json``."""
    arrays, meta = load_tensors(path / name, _remedy(path))
    listed = (state.get("files") or {}).get(name)
    if listed is not None and meta.get(DIGEST_KEY) != listed:
        raise DamagedFileError(path / name, f"it does not belong with {STATE_FILE} (another save's file)",
                               _remedy(path))
    return arrays


def load_checkpoint(path_dir, model=None, optimizer=None, scheduler=None, rng_state: dict | None = None,
                    restore_rng: bool = True) -> dict:
    """Restore what was saved into the given objects; return ``state.json`` (step, extra, ...).

    ``rng_state``: name -> ``numpy.random.Generator`` whose states are set from the file.
    Nothing is changed unless every part fits and every file is intact: the model's keys
    and shapes (``ValueError`` from ``load_state_dict`` listing them), the optimizer's
    parameters and shapes, the generators named, and each file's digest
    (``DamagedFileError`` naming the file).
    """
    path = Path(path_dir)
    state = read_state(path)
    try:  # everything is read and checked before anything is changed
        opt_sd = _optimizer_state(path, state) if optimizer is not None else None
        if opt_sd is not None:
            try:
                optimizer.check_state_dict(opt_sd)
            except ValueError as e:
                raise ValueError(f"checkpoint {str(path)!r} does not fit this optimizer: {e}") from e
        gens = _rng_to_restore(path, state, rng_state, restore_rng)
        if scheduler is not None:
            if state["scheduler"] is None:
                raise ValueError(f"checkpoint {str(path)!r} has no scheduler state, but a scheduler was given to "
                                 "load")
            if not isinstance(state["scheduler"].get("last_step"), int):
                raise TypeError(f"scheduler state {state['scheduler']!r} has no integer 'last_step'")
        arrays = None
        if model is not None:
            arrays = _read_arrays(path, MODEL_FILE, state)
            if sorted(arrays) != sorted(state["model_keys"]):
                raise DamagedFileError(path / MODEL_FILE, f"its keys differ from the {len(state['model_keys'])} "
                                       f"listed in {STATE_FILE}", _remedy(path))
    except (KeyError, TypeError, AttributeError, IndexError) as e:  # a state.json edited into another shape
        raise DamagedFileError(path / STATE_FILE, f"unexpected structure ({type(e).__name__}: {e})",
                               _remedy(path)) from None
    if arrays is not None:
        try:
            model.load_state_dict(arrays)
        except ValueError as e:
            raise ValueError(f"checkpoint {str(path)!r} does not fit this model: {e}") from e
    if opt_sd is not None:
        optimizer.load_state_dict(opt_sd)
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    for name, g in (rng_state or {}).items():
        g.bit_generator.state = gens[name]
    if restore_rng:
        mp_random.set_state(gens[None])
    return state


def _optimizer_state(path: Path, state: dict) -> dict:
    """The optimizer's state dict from ``state.json`` and ``optimizer.safetensors``."""
    if state["optimizer"] is None:
        raise ValueError(f"checkpoint {str(path)!r} has no optimizer state, but an optimizer was given to load")
    arrays = _read_arrays(path, OPTIMIZER_FILE, state)
    o = state["optimizer"]
    sd_state = {name: dict(sc) for name, sc in o["scalars"].items() if isinstance(sc, dict) or _bad(sc)}
    for key, entry in o["arrays"].items():
        name, k = entry if isinstance(entry, list) and len(entry) == 2 else _bad(entry)
        if key not in arrays:
            raise DamagedFileError(path / OPTIMIZER_FILE, f"it lacks array {key!r} listed in {STATE_FILE}",
                                   _remedy(path))
        sd_state.setdefault(name, {})[k] = arrays[key]
    hp = o["hparams"]
    if not isinstance(hp, dict) or not all(isinstance(v, (int, float)) or (isinstance(v, list) and all(
            isinstance(x, (int, float)) for x in v)) for v in hp.values()):
        raise TypeError(f"optimizer hyperparameters {hp!r} are not a dict of numbers")
    if not isinstance(o["param_names"], list) or not all(isinstance(n, str) for n in o["param_names"]):
        raise TypeError(f"optimizer param_names {o['param_names']!r} is not a list of names")
    return {"type": o["type"], "hparams": hp, "param_names": o["param_names"], "state": sd_state}


def _bad(entry):
    raise TypeError(f"unexpected entry {entry!r} in the optimizer's state")


def _rng_to_restore(path: Path, state: dict, rng_state, restore_rng: bool) -> dict:
    """Saved generator states by name (``None``: minipeft.random's), each tried on a scratch generator."""
    gens = state["rng"].get("generators", {})
    missing = sorted(set(rng_state or {}) - set(gens))
    if missing:
        raise ValueError(f"checkpoint has no state for generators {missing}; it saved {sorted(gens)}")
    out = {}
    for name, g in (rng_state or {}).items():
        out[name] = _from_json_able(gens[name])
        _try_state(type(g.bit_generator)(), out[name], path, f"generator {name!r}")
    if restore_rng:
        mp = _from_json_able(state["rng"]["minipeft"])
        if not isinstance(mp.get("seed"), int) or mp["seed"] < 0:
            raise TypeError(f"minipeft.random seed {mp.get('seed')!r} is not a non-negative integer")
        _try_state(np.random.default_rng().bit_generator, mp["cpu"], path, "minipeft.random")
        out[None] = mp
    return out


def _try_state(bit_generator, st, path: Path, what: str) -> None:
    try:
        bit_generator.state = st
    except (ValueError, TypeError, KeyError) as e:
        raise DamagedFileError(path / STATE_FILE, f"the saved state of {what} is not valid ({e})",
                               _remedy(path)) from None


def verify_checkpoint(path_dir) -> dict:
    """Read every file of a checkpoint and check it is complete and intact; return ``state.json``.

    Raises ``FileNotFoundError`` (a missing part) or ``DamagedFileError`` (naming the file).
    """
    path = Path(path_dir)
    state = read_state(path)
    _read_arrays(path, MODEL_FILE, state)
    if state.get("optimizer") is not None:
        _read_arrays(path, OPTIMIZER_FILE, state)
    return state


def list_checkpoints(root) -> list[tuple[int, Path]]:
    """Checkpoints ``root/step_XXXXXXXX`` that hold a ``state.json``, as (step, path), oldest first.

    A checkpoint whose save was killed between its two renames is put back first.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    for p in root.iterdir():  # .step_XXXXXXXX.old-*: the previous version of a checkpoint being replaced
        if p.name.startswith(".step_") and ".old-" in p.name:
            recover(root / p.name[1:p.name.index(".old-")])
    out = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and (p / STATE_FILE).exists():
            try:
                out.append((int(p.name[5:]), p))
            except ValueError:
                continue
    return sorted(out)


def latest_checkpoint(root) -> Path | None:
    """The newest checkpoint under ``root`` that holds a ``state.json`` (``None`` if there is none)."""
    cks = list_checkpoints(root)
    return cks[-1][1] if cks else None


def remove_checkpoint(path_dir) -> None:
    """Delete a checkpoint directory (renamed aside first, so a kill never leaves half of one)."""
    remove_directory(path_dir)


def checkpoint_path(root, step: int) -> Path:
    return Path(root) / f"step_{int(step):08d}"
