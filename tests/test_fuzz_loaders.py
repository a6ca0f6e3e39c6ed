"""Hypothesis fuzzing of every loader: whatever the bytes, a clear error naming the file, or a clean load.

"Clear" means a ``ValueError`` (``DamagedFileError`` is one) or ``FileNotFoundError`` whose
message names the file or its directory -- never a bare ``JSONDecodeError``,
``UnicodeDecodeError``, ``SafetensorError``, ``KeyError`` or ``TypeError`` from deep inside,
and never a hang or a giant allocation.
"""
from __future__ import annotations

import json
import struct
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minipeft.checkpoint import load_checkpoint, save_checkpoint
from minipeft.data.e2e import load_e2e_csv
from minipeft.gpt import GPT, GPTConfig
from minipeft.integrity import DamagedFileError, load_tensors
from minipeft.optim import AdamW
from minipeft.peft import LoraConfig, get_peft_model, load_adapter, save_adapter

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CFG = dict(vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=8)

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                         st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                 st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=4)), max_leaves=8)


def tiny(seed=0):
    return GPT(GPTConfig(**CFG), seed=seed).eval()


def expect_clear(load, where: Path):
    """Run ``load``; any failure must be a ValueError/FileNotFoundError naming ``where``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return load()
        except (ValueError, FileNotFoundError) as e:
            assert str(where) in str(e), f"error does not name {where}: {type(e).__name__}: {e}"
            return e


def mutated(base: dict, data) -> dict:
    """``base`` with some values replaced by random JSON, some keys dropped, maybe a key added."""
    d = dict(base)
    for k in data.draw(st.lists(st.sampled_from(sorted(base)), max_size=3, unique=True)) if base else []:
        if data.draw(st.booleans()):
            d[k] = data.draw(json_values)
        else:
            d.pop(k)
    if data.draw(st.booleans()):
        d[data.draw(st.text(min_size=1, max_size=8))] = data.draw(json_values)
    return d


# ------------------------------------------------------------------ adapter_config.json


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz") / "adapter"
    save_adapter(get_peft_model(tiny(), LoraConfig(r=2, target_modules=["c_attn"])), d)
    return d


@FUZZ
@given(data=st.data())
def test_fuzzed_adapter_config(adapter_dir, data):
    good = json.loads((adapter_dir / "adapter_config.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "a"
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes((adapter_dir / "adapter_model.safetensors").read_bytes())
        (d / "adapter_config.json").write_text(json.dumps(mutated(good, data)))
        expect_clear(lambda: load_adapter(tiny(), d), d)


@FUZZ
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_adapter_config_of_any_bytes(adapter_dir, raw):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "a"
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes((adapter_dir / "adapter_model.safetensors").read_bytes())
        (d / "adapter_config.json").write_bytes(raw)
        out = expect_clear(lambda: load_adapter(tiny(), d), d)
        assert isinstance(out, Exception)  # no random bytes make a LoRA config


# ------------------------------------------------------------------ config.json of a Hugging Face directory


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz") / "hf"
    tiny().save_hf(d)
    return d


@FUZZ
@given(data=st.data())
def test_fuzzed_gpt2_config(hf_dir, data):
    good = json.loads((hf_dir / "config.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "hf"
        d.mkdir()
        (d / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
        (d / "config.json").write_text(json.dumps(mutated(good, data)))
        expect_clear(lambda: GPT.from_hf(d), d)


# ------------------------------------------------------------------ safetensors headers


def safetensors_bytes(header, body: bytes, length: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + body


headers = st.dictionaries(
    st.text(min_size=1, max_size=6),
    st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "I64", "BOOL", "F8", "X", ""]),
                           "shape": st.lists(st.integers(-2, 2**40), max_size=3),
                           "data_offsets": st.lists(st.integers(-1, 2**40), min_size=0, max_size=3)}),
    max_size=3)


@FUZZ
@given(header=headers | st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()),
       body=st.binary(max_size=64), length=st.none() | st.integers(0, 2**64 - 1))
def test_safetensors_of_any_header(header, body, length):
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "x.safetensors"
        p.write_bytes(safetensors_bytes(header, body, length))
        out = expect_clear(lambda: load_tensors(p, "Remedy."), p)
        if isinstance(out, Exception):
            assert isinstance(out, DamagedFileError) and "Remedy." in str(out)


@FUZZ
@given(i=st.integers(0, 10**6), bit=st.integers(0, 7), cut=st.none() | st.integers(0, 10**6))
def test_checkpoint_model_file_with_a_changed_bit_or_cut(i, bit, cut):
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny()
        path = save_checkpoint(Path(tmp) / "ck", model, AdamW(model), step=1)
        f = path / ("model.safetensors" if i % 2 else "optimizer.safetensors")
        raw = bytearray(f.read_bytes())
        raw[i % len(raw)] ^= 1 << bit
        f.write_bytes(bytes(raw[:cut]) if cut is not None else bytes(raw))
        other = tiny(1)
        out = expect_clear(lambda: load_checkpoint(path, other, AdamW(other), restore_rng=False), f)
        if not isinstance(out, Exception):  # harmless change (header padding, metadata): the very same weights
            assert all(np.array_equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))


# ------------------------------------------------------------------ state.json


@FUZZ
@given(data=st.data())
def test_state_json_edited_by_hand(data):
    """Without its digest (as a person editing it would leave it), any structure gives a clear error."""
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny()
        path = save_checkpoint(Path(tmp) / "ck", model, AdamW(model), step=1)
        state = json.loads((path / "state.json").read_text())
        state.pop("minipeft_sha256")
        state = mutated(state, data)
        if "optimizer" in state and isinstance(state["optimizer"], dict) and data.draw(st.booleans()):
            state["optimizer"] = mutated(state["optimizer"], data)
        if "rng" in state and isinstance(state["rng"], dict) and data.draw(st.booleans()):
            state["rng"] = mutated(state["rng"], data)
        (path / "state.json").write_text(json.dumps(state))
        other = tiny(1)
        before = [a.copy() for a in other.state_dict().values()]
        out = expect_clear(lambda: load_checkpoint(path, other, AdamW(other), restore_rng=False), path)
        if isinstance(out, Exception):  # a failed load changes nothing
            assert all(np.array_equal(a, b) for a, b in zip(before, other.state_dict().values()))


# ------------------------------------------------------------------ E2E CSV


csv_text = st.lists(st.sampled_from(['mr', 'ref', ',', '"', '\n', '\r', 'name[', ']', 'The Eagle', 'area[riverside]',
                                     ', ', '\x00', 'é', '""']), max_size=30).map("".join)


@FUZZ
@given(raw=st.binary(max_size=120) | csv_text.map(lambda s: ("mr,ref\n" + s).encode("utf-8"))
       | csv_text.map(str.encode))
def test_e2e_csv_of_any_bytes(raw):
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "data.csv"
        p.write_bytes(raw)
        out = expect_clear(lambda: load_e2e_csv(p), p)
        if not isinstance(out, Exception):
            assert len(out.mrs) >= 1 and all(len(r) >= 1 for r in out.refs)
