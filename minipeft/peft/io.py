"""Adapter files in Hugging Face peft's format: ``save_adapter``, ``load_adapter``, ``from_pretrained``.

A saved adapter is a directory (``shared/reference/peft-format.md`` §1-4)::

    adapter_config.json        peft_config[name].to_dict(): peft's field names, json.dumps(indent=2, sort_keys=True)
    adapter_model.safetensors  {on-disk key: float32 tensor}, metadata {"format": "pt"} (as peft writes)

The adapter named ``"default"`` is saved in ``directory`` itself, any other in
``directory/<adapter_name>/`` (peft's ``save_pretrained``). Keys are peft's: the in-memory
name with the adapter name removed, so the name on disk does not matter. For GPT-2 files
``fan_in_fan_out`` is written ``true`` (peft forces it for GPT-2's Conv1D) while the tensors
keep the nn.Linear layout peft uses for every weight method; minipeft's Linear is (out, in)
already, so nothing is transposed either way. On load, ``fan_in_fan_out`` goes back to False.

Keys, for a module ``M = base_model.model.transformer.h.{i}.attn.c_attn`` (peft's unless noted):

=============  ===================================================  ==========================
method         keys                                                 shapes
=============  ===================================================  ==========================
LoRA           ``M.lora_A.weight``, ``M.lora_B.weight``             [r, in], [out, r]
DoRA           + ``M.lora_magnitude_vector``                        [out]
VeRA           ``M.vera_lambda_b``, ``M.vera_lambda_d``;            [out], [r];
               ``base_model.vera_A``, ``base_model.vera_B``         [r, max in], [max out, r]
(IA)³          ``M.ia3_l``                                          [out, 1]; [1, in] for
                                                                    feed-forward modules
prompt tuning  ``prompt_embeddings``                                [P, C]
prefix tuning  ``prompt_embeddings`` (the MLP output if projected)  [P, L * 2 * C]
LoHa           ``M.hada_w1_a``, ``M.hada_w1_b``, ``M.hada_w2_a``,   [out, r], [r, in], [out, r],
 (minipeft)    ``M.hada_w2_b``                                      [r, in]
LoKr           ``M.lokr_w1`` or ``M.lokr_w1_a``/``M.lokr_w1_b``;    peft's factor shapes
 (minipeft)    ``M.lokr_w2`` or ``M.lokr_w2_a``/``M.lokr_w2_b``
=============  ===================================================  ==========================

LoRA on slices (``LoraConfig.enable_lora``, loralib's ``MergedLinear``; lora_slices.py) has no
place in peft's format, so it is written as the plain LoRA with the same ΔW: rank r' = n·r
(n enabled slices; also every ``rank_pattern`` value), ``M.lora_A.weight`` the stacked
[A_1; A_2; ...] (r', in), ``M.lora_B.weight`` the block matrix B' (out, r') with B_i in its
slice's rows and its own r columns, zeros elsewhere, and ``lora_alpha`` (and ``alpha_pattern``)
times r'/r (rsLoRA: sqrt(r'/r)) so the scaling is unchanged. Such a file loads into peft and
into minipeft with the same outputs, but as a plain rank-r' LoRA: the slice structure is not
kept, so if training went on, the zero blocks of B' (rows of the disabled slices too) would train.

With ``bias="all"``/``"<method>_only"`` the chosen base biases are saved under their own
names; ``modules_to_save`` modules under their plain names (``base_model.model.lm_head.weight``).
peft cannot put LoHa or LoKr on GPT-2's Conv1D (peft issue #3767), so those GPT-2 files
are minipeft's own: peft's key names and config fields for an (out, in) Linear. Methods
peft lacks entirely use the same layout, with their own ``peft_type`` and config fields:

* ``"BOTTLENECK"`` (Houlsby, Pfeiffer; adapters.py): ``M.adapter_down.weight`` [m, d],
  ``M.adapter_down.bias`` [m], ``M.adapter_up.weight`` [d, m], ``M.adapter_up.bias`` [d] on
  ``attn.c_proj``/``mlp.c_proj``, plus ``base_model.model.transformer.h.{i}.ln_{1,2}.*``
  and ``...ln_f.*`` when the LayerNorms train;
* ``"BITFIT"``, ``"TOP_K_BLOCKS"``, ``"FULL"`` (selective.py): the trained base tensors
  under their own names, ``base_model.model.transformer.h.{i}.attn.c_attn.bias`` [3C] ...
  (Linear weights (out, in), unlike the Conv1D (in, out) of a GPT-2 checkpoint).

Loading reads and checks both files before touching the model, then adds the adapter
(``get_peft_model`` for a plain model, ``add_adapter`` for a ``PeftModel``) and copies the
tensors in (``PeftModel.load_peft_state_dict`` checks keys and shapes first). Any
problem -- a missing or damaged file, another method, another base shape, a module the
model lacks -- raises ``FileNotFoundError``/``ValueError`` naming the file, and the model is
left exactly as it was: same modules, same parameters, same trainability, same adapters.

Saving is atomic for the pair of files (``minipeft.atomic``): a kill never leaves an r=8
config beside r=4 weights. Files minipeft writes carry, in the safetensors metadata, a
digest of the tensors (``minipeft_sha256``) and of the config written beside them
(``minipeft_config_sha256``); peft ignores both. A changed tensor byte raises
``DamagedFileError``; a config that changed since it was saved (edited by hand, or damaged)
loads with a warning that names it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings

import numpy as np

from ..atomic import atomic_directory, recover
from ..backend import to_numpy
from ..integrity import DamagedFileError, json_digest, load_tensors, read_json, save_tensors
from ..nn import Module
from . import lora_init
from .config import PeftConfig
from .layer import BaseTunerLayer, walk
from .lora_slices import plain_lora_config, plain_lora_tensors
from .method import REGISTRY
from .model import PeftModel, get_peft_model

CONFIG_NAME = "adapter_config.json"  # peft's CONFIG_NAME
#: Config fields that only steer the initialization, which loading overwrites. A file may name an init
#: minipeft cannot run (prompt tuning from TEXT with a Hugging Face tokenizer, which is never downloaded),
#: so the adapter is built with these neutral values and the file's values are put back afterwards.
INIT_ONLY_FIELDS = {"PROMPT_TUNING": {"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
                                      "tokenizer_name_or_path": None, "tokenizer_kwargs": None}}
WEIGHTS_NAME = "adapter_model.safetensors"  # peft's SAFETENSORS_WEIGHTS_NAME
#: safetensors metadata key: digest of the adapter_config.json saved with the weights (peft ignores it)
CONFIG_DIGEST_KEY = "minipeft_config_sha256"
# GPT-2 modules that are transformers' Conv1D (weight stored (in, out)): peft sets fan_in_fan_out for them
_CONV1D_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def adapter_directory(directory, adapter_name: str = "default") -> str:
    """Where ``save_adapter`` puts ``adapter_name``: ``directory``, or ``directory/<name>`` if not "default"."""
    directory = os.fspath(directory)
    return directory if adapter_name == "default" else os.path.join(directory, adapter_name)


# ------------------------------------------------------------------ saving


def adapter_config_dict(model: PeftModel, adapter_name: str = "default", base_model_name_or_path=None) -> dict:
    """The ``adapter_config.json`` content for ``adapter_name``, as peft's ``save_pretrained`` writes it.

    ``inference_mode`` is written true (peft's value at save time); ``base_model_name_or_path``
    is the argument, else the config's, else the base model's ``name_or_path`` if it has
    one; ``fan_in_fan_out`` is true when the adapter sits on GPT-2 Conv1D modules. A LoRA
    with ``enable_lora`` is described as its equivalent plain LoRA (r and alpha times n).
    """
    cfg = model.peft_config[adapter_name]
    d = cfg.to_dict()
    if getattr(cfg, "enable_lora", None):  # LoRA on slices: the plain LoRA of rank n r (module docstring)
        d = plain_lora_config(d, cfg.enable_lora, cfg.use_rslora)
    d["inference_mode"] = True
    if base_model_name_or_path is not None:
        d["base_model_name_or_path"] = os.fspath(base_model_name_or_path)
    elif d.get("base_model_name_or_path") is None:
        d["base_model_name_or_path"] = getattr(model.get_base_model(), "__dict__", {}).get("name_or_path")
    if "fan_in_fan_out" in d:
        targets = [n for n, m in walk(model.get_base_model())
                   if isinstance(m, BaseTunerLayer) and adapter_name in m.adapter_names]
        d["fan_in_fan_out"] = any(n == t or n.endswith("." + t) for n in targets for t in _CONV1D_MODULES)
    return dict(sorted(d.items()))


def save_adapter(model: PeftModel, directory, adapter_name: str = "default", base_model_name_or_path=None,
                 path_initial_model_for_weight_conversion=None) -> str:
    """Write ``adapter_name`` of ``model`` in peft's format; returns the directory written.

    ``adapter_config.json`` (sorted keys, indent 2) and ``adapter_model.safetensors``
    (float32, metadata ``{"format": "pt"}``) go into ``directory`` for the "default"
    adapter and ``directory/<adapter_name>`` otherwise. The directory is written whole into a
    temporary directory and swapped in (``minipeft.atomic``): a failure or a kill at any
    moment leaves the previous adapter or the new one, never a mix; other entries of the
    directory (other adapters' sub-folders, outputs) are kept. The weights file carries
    digests of its tensors and of the config (``minipeft.integrity``), so a damaged file is
    caught when loading.

    A LoRA with ``enable_lora`` (slices of a fused layer) is written as the plain LoRA of
    rank r' = n·r with the same ΔW (block B', alpha times r'/r; see the module docstring).
    The slice structure is not kept in the file: loading it (into minipeft or peft) gives a
    plain rank-r' LoRA with the same outputs, whose disabled-slice rows would train if
    training continued. Keep the PeftModel (or its config) to go on training on slices.

    ``path_initial_model_for_weight_conversion`` (peft's name): the folder a PiSSA/OLoRA
    adapter was saved to right after ``get_peft_model``. The adapter is then written as the
    plain LoRA of rank 2r that applies to the *original* base weight, ``A' = [A; A0]``,
    ``B' = [B, -B0]`` (lora_init.py), as peft's ``save_pretrained`` does; unlike peft, the
    initial folder is only read, not rewritten.
    """
    if not isinstance(model, PeftModel):
        raise TypeError(f"save_adapter needs a PeftModel (from get_peft_model), got {type(model).__name__}")
    if adapter_name not in model.peft_config:
        raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {list(model.peft_config)}")
    config = adapter_config_dict(model, adapter_name, base_model_name_or_path)
    tensors = {}
    for key, arr in model.peft_state_dict(adapter_name).items():
        a = to_numpy(arr)
        if not np.issubdtype(a.dtype, np.floating):
            raise TypeError(f"adapter tensor {key} has dtype {a.dtype}; adapter files hold float tensors")
        tensors[key] = np.ascontiguousarray(a, dtype=np.float32)  # minipeft writes F32 (peft-format.md §2)
    if getattr(model.peft_config[adapter_name], "enable_lora", None):
        tensors = plain_lora_tensors(model, adapter_name, tensors)  # sliced lora_B -> block B' (out, n r)
    if path_initial_model_for_weight_conversion is not None:  # PiSSA/OLoRA -> plain LoRA on the original W
        initial = os.fspath(path_initial_model_for_weight_conversion)
        if config["peft_type"] != "LORA":
            raise ValueError(f"path_initial_model_for_weight_conversion converts LoRA adapters; {adapter_name!r} "
                             f"is {config['peft_type']}")
        config = lora_init.converted_config(config, initial)
        tensors = lora_init.converted_tensors(tensors, read_adapter(initial)[1], initial)
    if not tensors:
        raise ValueError(f"adapter {adapter_name!r} has no tensors to save")
    out = adapter_directory(directory, adapter_name)
    text = json.dumps(config, indent=2, sort_keys=True)
    # the whole directory is swapped in at once: a kill never leaves a new config beside old weights
    with atomic_directory(out, owned=(CONFIG_NAME, WEIGHTS_NAME)) as tmp:
        with open(tmp / CONFIG_NAME, "w", encoding="utf-8") as f:
            f.write(text)
        save_tensors(tensors, tmp / WEIGHTS_NAME, {"format": "pt"}, **{CONFIG_DIGEST_KEY: json_digest(config)})
    return out


# ------------------------------------------------------------------ reading


def _remedy(directory) -> str:
    return (f"Resave the adapter (save_adapter / peft's save_pretrained) into {os.fspath(directory)}, or "
            f"delete that folder")


def _find_files(directory, adapter_name: str) -> tuple[str, str]:
    d = os.fspath(directory)
    recover(d)  # a save killed between its two renames left the previous adapter aside
    if not os.path.isdir(d):
        raise FileNotFoundError(f"adapter directory {d} not found (expected a folder with {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME}, as written by save_adapter or peft's save_pretrained)")
    sub = os.path.join(d, adapter_name)
    if adapter_name != "default":
        recover(sub)
        if os.path.isfile(os.path.join(sub, CONFIG_NAME)):
            d = sub  # a non-default adapter saved by save_adapter / save_pretrained into its subfolder
    cfg, weights = os.path.join(d, CONFIG_NAME), os.path.join(d, WEIGHTS_NAME)
    if not os.path.isfile(cfg):
        raise FileNotFoundError(f"{cfg} not found: an adapter directory needs {CONFIG_NAME} and {WEIGHTS_NAME}. "
                                f"{_remedy(d)}")
    if not os.path.isfile(weights):
        pickled = os.path.isfile(os.path.join(d, "adapter_model.bin"))
        hint = (" (found adapter_model.bin, a pickle file, which minipeft never reads: re-save it with peft's "
                "save_pretrained(safe_serialization=True))") if pickled else ""
        raise FileNotFoundError(f"{weights} not found{hint}. {_remedy(d)}")
    return cfg, weights


def _read_config_dict(path: str) -> dict:
    return read_json(path, _remedy(os.path.dirname(path)))


def read_adapter_config(path: str) -> tuple[PeftConfig, dict]:
    """Parse ``adapter_config.json``: (minipeft's config, the file's ``INIT_ONLY_FIELDS`` values).

    Unknown keys (of a newer peft) are dropped with a warning; the config holds neutral
    values for the init-only fields, the second item the file's own. A damaged file raises
    ``DamagedFileError`` (a ValueError) naming it.
    """
    return _config_from_dict(path, _read_config_dict(path))


def _config_from_dict(path: str, d: dict) -> tuple[PeftConfig, dict]:
    if not isinstance(d.get("peft_type"), str):
        got = f"got {d['peft_type']!r}" if "peft_type" in d else "it has no 'peft_type'"
        raise ValueError(f"{path}: 'peft_type' must be a method name such as \"LORA\"; {got}")
    neutral = INIT_ONLY_FIELDS.get(d["peft_type"], {})
    try:  # keys of a newer peft: dropped with a warning, as peft does
        config = PeftConfig.from_dict({**d, **{k: v for k, v in neutral.items() if k in d}}, strict=False)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{path}: {e}") from e
    if config.peft_type not in REGISTRY:
        raise ValueError(f"{path}: peft_type {config.peft_type!r} has a config but no minipeft method; "
                         f"methods: {sorted(REGISTRY)}")
    return config, {k: d[k] for k in neutral if k in d}


def read_adapter_weights(path: str) -> dict[str, np.ndarray]:
    """The tensors of ``adapter_model.safetensors`` as NumPy arrays; ``DamagedFileError`` if damaged."""
    return _read_weights(path)[0]


def _read_weights(path: str) -> tuple[dict[str, np.ndarray], dict]:
    tensors, meta = load_tensors(path, _remedy(os.path.dirname(path)))
    bad = [f"{k} ({a.dtype})" for k, a in tensors.items() if not np.issubdtype(a.dtype, np.floating)]
    if bad:
        raise ValueError(f"{path}: adapter tensors must be floats, got {bad[:5]}")
    if not tensors:
        raise DamagedFileError(path, "it holds no tensors (an adapter file has at least one)",
                               _remedy(os.path.dirname(path)))
    return tensors, meta


def read_adapter(directory, adapter_name: str = "default", is_trainable: bool = False):
    """(config, {on-disk key: array}, init-only fields, config path, weights path) of a saved adapter.

    The config comes back ready for minipeft: ``inference_mode = not is_trainable`` and
    ``fan_in_fan_out=False`` (the file's true describes GPT-2's Conv1D; minipeft's Linear
    is (out, in) and the tensors are in that layout already); ``INIT_ONLY_FIELDS`` hold
    neutral values and the file's values come separately (``load_adapter`` restores them).
    """
    cfg_path, weights_path = _find_files(directory, adapter_name)
    d = _read_config_dict(cfg_path)
    tensors, meta = _read_weights(weights_path)
    saved = meta.get(CONFIG_DIGEST_KEY)
    if saved is not None and saved != json_digest(d):
        warnings.warn(f"{cfg_path} is not the config saved with {weights_path} (its content changed after "
                      f"save_adapter wrote them: edited by hand, or damaged); loading it as it is now. If this "
                      f"is not intended, resave the adapter", stacklevel=3)
    config, init_only = _config_from_dict(cfg_path, d)
    changes = {"inference_mode": not is_trainable}
    if any(f.name == "fan_in_fan_out" for f in dataclasses.fields(config)):
        changes["fan_in_fan_out"] = False
    try:
        config = dataclasses.replace(config, **changes)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    return config, tensors, init_only, cfg_path, weights_path


# ------------------------------------------------------------------ loading


class _Snapshot:
    """What adding an adapter may change in a model, to put it back if loading fails."""

    def __init__(self, root: Module, owner: Module) -> None:
        self.root = root
        self.modules = [(n, m) for n, m in walk(root) if n]  # pre-order: parents first
        self.flags = [(p, p.requires_grad, p.data) for p in owner.parameters()]  # arrays by reference
        self.training = [(m, m.training) for m in owner.modules()]

    def restore(self) -> None:
        for name, module in self.modules:
            if self.root.get_submodule(name) is not module:
                self.root.set_submodule(name, module)
        for p, flag, data in self.flags:
            p.requires_grad, p.data = flag, data
        for m, mode in self.training:
            object.__setattr__(m, "training", mode)


def load_adapter(model: Module, directory, adapter_name: str = "default", is_trainable: bool = False) -> PeftModel:
    """Add the adapter saved in ``directory`` (by minipeft or peft) to ``model``; returns the PeftModel.

    ``model`` is a plain model (wrapped with ``get_peft_model``; the adapter is active) or
    a ``PeftModel`` of the same method (the adapter is added under ``adapter_name`` and
    left inactive, as peft's ``load_adapter``: call ``set_adapter``). ``is_trainable``:
    False freezes the adapter (peft's default). Errors leave ``model`` unchanged.
    """
    if not isinstance(model, Module):
        raise TypeError(f"load_adapter needs a minipeft model (GPT or PeftModel), got {type(model).__name__}")
    config, tensors, init_only, cfg_path, weights_path = read_adapter(directory, adapter_name, is_trainable)
    if isinstance(model, PeftModel):
        if config.peft_type != model.peft_type:
            raise ValueError(
                f"{cfg_path}: a {config.peft_type} adapter cannot join this {model.peft_type} model (all adapters "
                f"of one PeftModel use one method); load it into the plain base model instead")
        if adapter_name in model.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists in the model; pass another adapter_name "
                             f"or delete_adapter({adapter_name!r}) first")
    root = model.get_base_model() if isinstance(model, PeftModel) else model
    snap = _Snapshot(root, model)
    peft_model, added = None, False
    try:
        if isinstance(model, PeftModel):
            peft_model = model
            peft_model.add_adapter(adapter_name, config)
        else:
            peft_model = get_peft_model(model, config, adapter_name)
        added = True
        peft_model.load_peft_state_dict(tensors, adapter_name)
    except Exception as e:
        if added and peft_model is model:
            _remove_adapter(peft_model, adapter_name)
        if peft_model is not None and peft_model is not model:
            peft_model._release()  # the plain model is not wrapped after all
        snap.restore()
        if isinstance(e, (ValueError, TypeError, KeyError, AttributeError, IndexError)):  # caused by the file
            where = weights_path if added else cfg_path
            raise ValueError(f"cannot load the adapter in {where} into this model (model left unchanged): "
                             f"{e}") from e
        raise
    for k, v in init_only.items():  # the file's own init settings, so that saving again writes them
        setattr(peft_model.peft_config[adapter_name], k, v)
    return peft_model


def _remove_adapter(model: PeftModel, adapter_name: str) -> None:
    """``delete_adapter`` without its side effects on merged layers (the new adapter was never merged)."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    merged = [(m, list(m.merged_adapters)) for m in layers]
    for m in layers:
        m.merged_adapters = []  # delete_adapter would unmerge the other adapters otherwise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.delete_adapter(adapter_name)
    finally:
        for m, names in merged:
            m.merged_adapters = names


def from_pretrained(base_model: Module, directory, adapter_name: str = "default",
                    is_trainable: bool = False) -> PeftModel:
    """peft's ``PeftModel.from_pretrained(base, dir)``: wrap ``base_model`` with the adapter saved in ``directory``."""
    if isinstance(base_model, PeftModel):
        raise TypeError("from_pretrained takes the plain base model; to add an adapter to a PeftModel use "
                        "load_adapter(peft_model, directory, adapter_name)")
    return load_adapter(base_model, directory, adapter_name, is_trainable)


__all__ = ["save_adapter", "load_adapter", "from_pretrained", "read_adapter", "read_adapter_config",
           "read_adapter_weights", "adapter_config_dict", "adapter_directory", "CONFIG_NAME", "WEIGHTS_NAME"]
