"""minipeft.peft: parameter-efficient fine-tuning methods behind one API (Hugging Face peft's).

Use::

    from minipeft.peft import LoraConfig, get_peft_model
    model = get_peft_model(gpt, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))
    model.print_trainable_parameters()   # trainable params: ... || all params: ... || trainable%: ...
    out = model(idx, targets)            # calls the wrapped GPT
    model.merge_and_unload()             # plain GPT with the adapter folded into its weights

Names match peft's: ``PeftModel.base_model`` (a ``TunerModel``) ``.model`` (the GPT), so
``model.named_parameters()`` gives ``base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight``,
and ``model.peft_state_dict()`` gives peft's on-disk keys (the adapter name stripped).

How a method plugs in (see lora.py for a full example, vera.py for model-level state)
-----------------------------------------------------------------------------------
1. **Config**: a dataclass subclassing ``config.PeftConfig`` with a class attribute
   ``peft_type = "IA3"`` (defining it registers the class for ``PeftConfig.from_dict``),
   ``default_target_modules`` (GPT-2's peft default, used when ``target_modules`` is None),
   peft's field names and defaults, a comment on each, checks in ``__post_init__``.
   ``json_omit`` lists inherited fields peft does not write for this method (prompt tuning:
   ``("target_modules", "exclude_modules", "modules_to_save")``); ``unsupported_fields``
   lists peft fields minipeft lacks (accepted on read only at their default).
   ``config.matches(name)`` is peft's target matching (names/suffixes, regex, exclusions,
   layers_to_transform); ``seed`` (minipeft only, never saved) seeds the init.
2. **Layer** (methods that wrap modules): subclass ``tuner.BaseTunerLayer``. Its
   ``__init__(base_layer)`` creates the per-adapter containers; set
   ``adapter_layer_names`` (attributes that are ``nn.ModuleDict``/``nn.ParameterDict``
   keyed by adapter name, holding every tensor to save: these names define the keys) and
   ``other_param_names`` (per-adapter hyper-parameter dicts, deleted with the adapter).
   Implement ``update_layer(adapter_name, config, rng, name=..., tuner_model=...)``
   (create one adapter: draw from ``rng``, a numpy Generator; use the base weight's
   dtype/device, see ``lora.param_dtype_xp``/``new_param``), ``adapter_forward(x,
   adapter, base_result)`` (the Tensor the adapter adds to the base output, or None), and
   for weight methods ``get_delta_weight(adapter)`` (a Tensor (out, in)). The base class
   gives ``forward`` (base + active adapters; base only when disabled or merged),
   ``merge``/``unmerge`` (via ``merged_weight``/``unmerged_weight``: override them for a
   non-additive merge, e.g. (IA)³'s W·l, or raise TypeError for bottleneck adapters),
   ``set_adapter`` (only active adapters require grad), ``delete_adapter``,
   ``enable_adapters``, ``adapter_names``, ``merged``, ``base_weight()`` (dequantizes a
   base that has ``dequantize()``). A layer whose effect is not additive may override
   ``forward`` itself (keep the disable/merged logic).
3. **Method**: subclass ``tuner.PeftMethod``, set ``peft_type``, ``config_class``,
   ``layer_class`` and ``mergeable`` (False: ``merge_*`` raise), decorate with
   ``@tuner.register`` (fills ``REGISTRY``), and import the module below. Hooks, all with
   defaults fit for wrapping methods: ``prepare_config`` (fill defaults),
   ``check_new_adapter`` (conflicts with existing adapters), ``find_targets(model, config)``
   (return ``[]`` for prompt/prefix tuning, which wrap nothing), ``prepare(peft_model,
   config, adapter, targets)`` (model-level state: register modules on ``peft_model``,
   e.g. ``peft_model.prompt_encoder = ModuleDict()`` for peft's in-memory name
   ``prompt_encoder.default.embedding.weight``, or on ``peft_model.base_model`` like
   VeRA's ``vera_A``), ``wrap`` (wrap or extend one module), ``mark_trainable`` (``bias``
   none/all/<method>_only), ``forward(peft_model, *args, **kw)`` (prompt tuning passes
   ``inputs_embeds_prefix=``, prefix tuning ``prefix_key_values=`` to the GPT),
   ``extra_adapter_state`` (model-level tensors as (in-memory key, on-disk key, Tensor)),
   ``set_adapter`` (trainability of model-level state), ``delete_adapter``,
   ``add_weighted_adapter``. ``get_peft_model`` freezes the base, calls these, rolls
   everything back if any step raises, and leaves only the active adapter trainable.
   ``PeftModel`` owns the other modules of the model too: ``modules_to_save`` entries
   become ``ModulesToSaveWrapper`` (a trainable copy per adapter).

For io.py (save_adapter / load_adapter in peft's format)
-------------------------------------------------------
* ``model.peft_config[name].to_dict()`` is ``adapter_config.json`` (write it with
  ``json.dumps(d, indent=2, sort_keys=True)``; set ``inference_mode=True``,
  ``base_model_name_or_path``, and for GPT-2 files ``fan_in_fan_out=True`` as peft does;
  minipeft's Linear is (out, in), so the LoRA tensors need no transpose).
  ``PeftConfig.from_dict(d)`` reads it back (unknown keys raise; ``strict=False`` warns
  and drops them, which is peft's own behaviour for newer files).
* ``model.peft_state_dict(name)`` -> ``{on-disk key: array}``: every tensor of one adapter
  (what ``adapter_state_dict(name)`` lists with in-memory keys), enumerated by walking the
  tuner layers' ``adapter_layer_names`` dicts, the ``ModulesToSaveWrapper`` copies, the
  method's ``extra_adapter_state`` and, with ``bias != "none"``, the chosen biases. The
  on-disk key is the in-memory key with the adapter segment removed:
  ``...c_attn.lora_A.default.weight`` -> ``...c_attn.lora_A.weight``,
  ``...lora_magnitude_vector.default`` -> ``...lora_magnitude_vector``,
  ``...lm_head.modules_to_save.default.weight`` -> ``...lm_head.weight``,
  ``base_model.vera_A.default`` -> ``base_model.vera_A``. Save as float32 safetensors with
  ``metadata={"format": "pt"}``; the "default" adapter goes at the top level, others in a
  subfolder named after the adapter.
* Loading: build the adapter from the config (``get_peft_model`` or ``add_adapter``),
  then ``model.load_peft_state_dict(arrays, name)``: it maps on-disk keys back, checks
  missing/unexpected keys and shapes first and changes nothing on error. To leave the
  model as it was when the file is bad, load into a freshly added adapter and
  ``delete_adapter`` (or discard the new PeftModel) if that raises.
"""
from .config import CONFIG_CLASSES, PeftConfig
from .tuner import (REGISTRY, BaseTunerLayer, ModulesToSaveWrapper, PeftMethod, PeftModel, TunerModel,
                    get_peft_model, register)
from .lora import LoraConfig, LoraLayer  # noqa: E402  (importing a method module registers it)
from .loha import LoHaConfig, LoHaLayer
from .lokr import LoKrConfig, LoKrLayer
from .vera import VeraConfig, VeraLayer
from .io import from_pretrained, load_adapter, save_adapter  # peft-format adapter files

__all__ = [
    "get_peft_model", "PeftModel", "PeftConfig", "PeftMethod", "BaseTunerLayer", "ModulesToSaveWrapper",
    "TunerModel", "REGISTRY", "CONFIG_CLASSES", "register",
    "LoraConfig", "LoraLayer", "LoHaConfig", "LoHaLayer", "LoKrConfig", "LoKrLayer", "VeraConfig", "VeraLayer",
    "save_adapter", "load_adapter", "from_pretrained",
]

# adapters, (IA)³, prompt and prefix tuning, selective fine-tuning (importing registers them)
from .adapters import BottleneckConfig, BottleneckLayer, HoulsbyConfig, PfeifferConfig  # noqa: E402
from .ia3 import IA3Config, IA3Layer  # noqa: E402
from .prefix_tuning import (PrefixTuningConfig, load_prefix_prompt_embeddings,  # noqa: E402
                            prefix_prompt_embeddings, remove_reparameterization)
from .prompt_tuning import PromptTuningConfig  # noqa: E402
from .selective import BitFitConfig, FullFineTuningConfig, TopKBlocksConfig  # noqa: E402

__all__ += [
    "BottleneckConfig", "BottleneckLayer", "HoulsbyConfig", "PfeifferConfig", "IA3Config", "IA3Layer",
    "PromptTuningConfig", "PrefixTuningConfig", "prefix_prompt_embeddings", "load_prefix_prompt_embeddings",
    "remove_reparameterization", "BitFitConfig", "TopKBlocksConfig", "FullFineTuningConfig",
]
from .side_tuning import LSTConfig, QSTConfig, SideTuningConfig, held_leaf_bytes, set_alpha  # noqa: E402
__all__ += ["SideTuningConfig", "LSTConfig", "QSTConfig", "set_alpha", "held_leaf_bytes"]
