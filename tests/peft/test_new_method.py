"""The walk-through of minipeft/peft/README.md, done: a new method in one file plus one registry line.

The code between the two rulers below is what ``minipeft/peft/rank_one.py`` would hold: a
config, a layer and a method with its recipe. Registering it is one line
(``register(RankOneMethod)`` here; in the package, the module's import in
``minipeft/peft/__init__.py``, where ``@register`` sits on the class). The tests then use
the method exactly as they use LoRA: nothing else in minipeft is edited.
"""
from dataclasses import dataclass

import numpy as np
import pytest

from minipeft import functional as F
from minipeft.nn import Parameter, ParameterDict, init
from minipeft.peft import (REGISTRY, BaseTunerLayer, PeftConfig, PeftMethod, PeftModel, Recipe, from_pretrained,
                           get_peft_model, method_table, register, save_adapter)
from minipeft.peft.layer import param_dtype_xp

from . import batch, logits, perturb, tiny_gpt, train

# ------------------------------------------------------------------------- minipeft/peft/rank_one.py


@dataclass
class RankOneConfig(PeftConfig):
    """A rank-one weight change ΔW = scale · u vᵀ on each target (LoRA with r = 1, its own names)."""

    peft_type = "RANK_ONE"
    default_target_modules = ["c_attn"]  # GPT-2's targets when target_modules is None

    scale: float = 1.0  # ΔW = scale · u vᵀ


class RankOneLayer(BaseTunerLayer):
    """``y = base(x) + scale · (x · v) u`` with u (out,) = 0 and v (in,) Kaiming-uniform at init."""

    adapter_layer_names = ("rank_one_u", "rank_one_v")  # the saved tensors, per adapter
    other_param_names = ("scale",)  # per-adapter settings, deleted with the adapter

    def __init__(self, base_layer) -> None:
        super().__init__(base_layer)
        self.rank_one_u, self.rank_one_v = ParameterDict(), ParameterDict()
        self.scale: dict[str, float] = {}

    def update_layer(self, adapter_name: str, config: RankOneConfig, rng, **ctx) -> None:
        dtype, xp = param_dtype_xp(self.base_layer)  # the base weight's dtype and device
        u = np.zeros(self.out_features)  # zero: the layer is the base at step 0
        v = init.kaiming_uniform(rng, (1, self.in_features))[0]
        self.rank_one_u[adapter_name] = Parameter.from_numpy(u, dtype, xp)
        self.rank_one_v[adapter_name] = Parameter.from_numpy(v, dtype, xp)
        self.scale[adapter_name] = config.scale

    def adapter_forward(self, x, adapter: str, base_result):
        v = F.reshape(self.rank_one_v[adapter], (1, -1))  # (1, in)
        return F.linear(x, v) * self.rank_one_u[adapter] * self.scale[adapter]  # (..., 1) * (out,) -> (..., out)

    def get_delta_weight(self, adapter: str):
        u = F.reshape(self.rank_one_u[adapter], (-1, 1))  # (out, 1)
        v = F.reshape(self.rank_one_v[adapter], (1, -1))  # (1, in)
        return u * v * self.scale[adapter]  # (out, in): merge and unmerge come from BaseTunerLayer


class RankOneMethod(PeftMethod):  # in the package: decorated with @register
    config_class = RankOneConfig
    layer_class = RankOneLayer
    recipes = (Recipe("rank_one", "rank-one ΔW", "reparameterization",
                      lambda n_layer, n_embd: RankOneConfig(target_modules=["c_attn", "c_fc"]), lr=1e-2),)


# --------------------------------------------------------------------------------------------------


@pytest.fixture
def rank_one():
    register(RankOneMethod)  # the one registry line
    yield RankOneMethod
    REGISTRY.pop("RANK_ONE")


def test_a_new_method_trains_saves_loads_and_merges(rank_one, tmp_path):
    base = tiny_gpt()
    idx, _ = batch()
    y0 = logits(base, idx)
    model = get_peft_model(base, RankOneConfig())
    np.testing.assert_array_equal(logits(model, idx), y0)  # u = 0: the base at step 0
    assert model.peft_type == "RANK_ONE" and model.method is rank_one
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"base_model.model.transformer.h.{i}.attn.c_attn.rank_one_{w}.default"
                         for i in range(2) for w in "uv"]
    losses = train(model, steps=4, lr=0.5)
    assert losses[-1] < losses[0]
    perturb(model, 0.3)  # move every vector off its init
    want = logits(model, idx)

    save_adapter(model, tmp_path)  # peft's format: adapter_config.json + adapter_model.safetensors
    assert '"peft_type": "RANK_ONE"' in (tmp_path / "adapter_config.json").read_text()
    assert sorted(model.peft_state_dict())[:2] == ["base_model.model.transformer.h.0.attn.c_attn.rank_one_u",
                                                    "base_model.model.transformer.h.0.attn.c_attn.rank_one_v"]
    loaded = from_pretrained(tiny_gpt(), tmp_path)  # PeftConfig.from_dict finds the config through REGISTRY
    assert isinstance(loaded, PeftModel) and type(loaded.peft_config["default"]) is RankOneConfig
    np.testing.assert_array_equal(logits(loaded, idx), want)

    with model.disable_adapter():
        np.testing.assert_array_equal(logits(model, idx), y0)
    merged = model.merge_and_unload()  # W + scale · u vᵀ
    np.testing.assert_allclose(logits(merged, idx), want, atol=1e-5)


def test_the_new_method_joins_the_method_table(rank_one):
    table = method_table()
    assert "rank_one" in table and table["rank_one"].label == "rank-one ΔW"
    assert list(table).index("rank_one") < list(table).index("houlsby")  # listed with its family
    model = get_peft_model(tiny_gpt(), table["rank_one"].config(2, 16))
    assert model.get_nb_trainable_parameters()[0] == 2 * (3 * 16 + 16 + 4 * 16 + 16)  # u and v on c_attn and c_fc


def test_registering_checks_the_config_and_names():
    class NoType(PeftMethod):
        config_class = PeftConfig

    with pytest.raises(TypeError, match="must be a PeftConfig subclass with a peft_type"):
        register(NoType)

    @dataclass
    class LoraAgain(PeftConfig):
        peft_type = "LORA"

    class Again(PeftMethod):
        config_class = LoraAgain

    with pytest.raises(ValueError, match="'LORA' is registered already"):
        register(Again)

    @dataclass
    class Other(PeftConfig):
        peft_type = "OTHER_TOY"

    class SameRecipeName(PeftMethod):
        config_class = Other
        recipes = (Recipe("lora", "again", "reparameterization", lambda n, d: Other(), lr=1e-2),)

    with pytest.raises(ValueError, match=r"recipe names \['lora'\]"):
        register(SameRecipeName)
    assert "OTHER_TOY" not in REGISTRY
    with pytest.raises(ValueError, match="family 'neither' is not one of"):
        Recipe("x", "x", "neither", lambda n, d: Other(), lr=1e-2)
