"""Mixed-adapter batches: ``PeftModel(idx, adapter_names=[...])`` and ``generate(..., adapter_names=...)``.

Each row must get what its adapter alone gives (float64, so the sums agree to rounding),
the errors are peft's, the multi-adapter server gives the same logits, and, where peft runs
on the CPU, peft's own mixed batch gives the same logits too.
"""
import os
import tempfile

import numpy as np
import pytest

import minipeft.peft as mp
from minipeft.gpt import GPT
from minipeft.peft import LoraConfig, from_pretrained, get_peft_model, load_adapter, save_adapter
from minipeft.serve import LoraServer, ServeConfig

from . import VOCAB, perturb, tiny_gpt

NAMES = ["b", "__base__", "default", "c", "b", "default"]


def model(dtype="float64"):
    """Three LoRA adapters of ranks 2, 4, 3 on different targets (c only on one block)."""
    pm = get_peft_model(tiny_gpt(dtype), LoraConfig(r=2, init_lora_weights=False, seed=1))
    pm.add_adapter("b", LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False,
                                   seed=2))
    pm.add_adapter("c", LoraConfig(r=3, use_rslora=True, target_modules=["mlp.c_proj"], layers_to_transform=[1],
                                   init_lora_weights=False, seed=3))
    return pm.eval()


def ids(B=len(NAMES), T=7, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (B, T))


def alone(pm, name, idx):
    if name == "__base__":
        with pm.disable_adapter():
            return pm(idx).logits.data
    pm.set_adapter(name)
    return pm(idx).logits.data


def test_each_row_gets_its_own_adapter():
    pm, idx = model(), ids()
    out = pm(idx, adapter_names=NAMES).logits.data
    for m, name in enumerate(NAMES):
        np.testing.assert_allclose(out[m], alone(pm, name, idx[m:m + 1])[0], rtol=0, atol=1e-12, err_msg=name)
    assert not np.allclose(out[0], out[1])  # the adapters do change the output


def test_generate_with_adapter_names_equals_each_row_alone():
    pm, idx = model(), ids(T=5)
    out = pm.generate(idx, 6, greedy=True, adapter_names=NAMES)
    for m, name in enumerate(NAMES):
        if name == "__base__":
            with pm.disable_adapter():
                want = pm.generate(idx[m:m + 1], 6, greedy=True)
        else:
            pm.set_adapter(name)
            want = pm.generate(idx[m:m + 1], 6, greedy=True)
        np.testing.assert_array_equal(out[m], want[0], err_msg=name)
    assert all(m.batch_adapters is None for m in pm.modules() if isinstance(m, mp.LoraLayer))  # cleared after


def test_gradients_flow_through_the_rows_of_each_adapter():
    pm = model()
    pm(ids(), adapter_names=NAMES).logits.sum().backward()  # eval mode, but with a graph
    grads = [p.grad for n, p in pm.named_parameters() if ".default." in n]
    assert grads and all(g is not None for g in grads)


def test_errors_as_peft():
    pm, idx = model(), ids()
    with pytest.raises(ValueError, match="non-existing adapter.*nope"):
        pm(idx, adapter_names=NAMES[:-1] + ["nope"])
    with pytest.raises(ValueError, match="Length of adapter_names.*5 and 6"):
        pm(idx, adapter_names=NAMES[:-1])
    with pytest.raises(TypeError, match="list of adapter names"):
        pm(idx, adapter_names="b")
    pm.train()
    with pytest.raises(ValueError, match="training mode"):
        pm(idx, adapter_names=NAMES)
    pm.eval()
    pm.merge_adapter(["b"])
    with pytest.raises(ValueError, match="merged adapters.*unmerge_adapter"):
        pm(idx, adapter_names=NAMES)
    pm.unmerge_adapter()
    with pm.disable_adapter(), pytest.raises(ValueError, match="disable_adapter"):
        pm(idx, adapter_names=NAMES)
    pm.add_adapter("d", LoraConfig(r=2, use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        pm(idx[:1], adapter_names=["d"])
    pm.add_adapter("s", LoraConfig(r=2, modules_to_save=["ln_f"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        pm(idx[:1], adapter_names=["s"])
    ia3 = get_peft_model(tiny_gpt(), mp.IA3Config()).eval()
    with pytest.raises(TypeError, match="LoRA adapters only"):
        ia3(idx[:1], adapter_names=["default"])
    np.testing.assert_allclose(pm(idx, adapter_names=NAMES).logits.data,  # the errors left the model working
                               model()(idx, adapter_names=NAMES).logits.data, rtol=0, atol=1e-12)


def test_the_server_gives_the_same_logits(tmp_path):
    pm, idx = model(), ids()
    server = LoraServer(tiny_gpt("float64"), ServeConfig(rank_classes=(2, 4)))
    for name in ("default", "b", "c"):
        save_adapter(pm, tmp_path, name)
        server.add_adapter(name, tmp_path / name if name != "default" else tmp_path)
    got, want = server.forward(idx, NAMES).data, pm(idx, adapter_names=NAMES).logits.data
    # the server keeps adapters as float32 on the host (serve_adapters.py): float32 rounding of A and B
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
    assert server.resident_adapters() == ["b", "default", "c"]


def test_live_against_peft_mixed_batch():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    pm = get_peft_model(tiny_gpt(), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"]))
    pm.add_adapter("other", LoraConfig(r=4, lora_alpha=4, target_modules=["c_fc"], seed=5))
    perturb(pm, 0.3, seed=1)
    for n, p in pm.named_parameters():
        if ".other." in n:
            p.data = (p.data + 0.3 * np.random.default_rng(p.size).standard_normal(p.shape)).astype(p.dtype)
    names = ["other", "__base__", "default", "other"]
    idx = ids(B=4)
    ours = pm.eval()(idx, adapter_names=names).logits.data
    with tempfile.TemporaryDirectory() as d:
        base = tiny_gpt()
        base.save_hf(os.path.join(d, "base"))
        save_adapter(pm, os.path.join(d, "a"), "default")
        save_adapter(pm, os.path.join(d, "a"), "other")
        hf = transformers.GPT2LMHeadModel.from_pretrained(os.path.join(d, "base")).eval()
        theirs = peft.PeftModel.from_pretrained(hf, os.path.join(d, "a")).eval()
        theirs.load_adapter(os.path.join(d, "a", "other"), adapter_name="other")
        with torch.no_grad():
            ref = theirs(torch.tensor(idx), adapter_names=names).logits.numpy()
        with pytest.raises(ValueError, match="non-existing adapter"):  # peft's error, which minipeft keeps
            theirs(torch.tensor(idx), adapter_names=["nope"] * 4)
        # our model loaded from the same files: the same logits as the one that wrote them
        loaded = from_pretrained(GPT.from_hf(os.path.join(d, "base")), os.path.join(d, "a"))
        load_adapter(loaded, os.path.join(d, "a", "other"), "other")
        again = loaded.eval()(idx, adapter_names=names).logits.data
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()
    assert np.abs(again - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.gpu
def test_mixed_batch_on_the_gpu():
    from minipeft.backend import to_numpy

    pm, idx = model("float32"), ids()
    want = pm(idx, adapter_names=NAMES).logits.data
    pm.to("cuda")
    got = to_numpy(pm(idx, adapter_names=NAMES).logits.data)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    toks = to_numpy(pm.generate(idx, 4, greedy=True, adapter_names=NAMES))
    assert toks.shape == (len(NAMES), idx.shape[1] + 4)
