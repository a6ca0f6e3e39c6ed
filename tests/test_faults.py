"""Fault injection: a save killed at any moment never loses the previous version; damage is named.

1. **Kills.** A child process (forked, so it starts in milliseconds) saves a checkpoint, an
   adapter or a cached base over a previous one and is killed with SIGKILL -- once before each
   file-system step of the save in turn (``os.replace``, ``fsync``, ``mkdir``, the tensor
   writes, ``rmtree`` ...), and at random moments while it saves in a loop. After every kill
   the directory must load, and hold exactly one of the two versions, whole.
2. **Damage.** Each file type is truncated and has bytes flipped; loading must raise an error
   that names the file (and say what to do), or -- where the change is harmless, e.g. in
   whitespace -- give back exactly what was saved. Never a silently different model.
3. **Resume.** ``train(resume='auto')`` skips a damaged newest checkpoint with a warning and
   resumes from the newest intact one.
"""
from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from minipeft import pretrained
from minipeft.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from minipeft.gpt import GPT, GPTConfig
from minipeft.integrity import DamagedFileError
from minipeft.optim import AdamW
from minipeft.peft import LoraConfig, get_peft_model, load_adapter, save_adapter
from minipeft.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(signal, "SIGKILL"),
                                reason="fault injection forks and kills processes (POSIX)")
FORK = multiprocessing.get_context("fork") if hasattr(os, "fork") else None
CFG = dict(vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=8)


def tiny(seed: int) -> GPT:
    return GPT(GPTConfig(**CFG), seed=seed).eval()


def arrays(model) -> dict:
    return {k: np.array(v) for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and np.array_equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ the three kinds of save


class Checkpoints:
    """Version v: model seed v, AdamW after v + 1 steps, step 10 v (all must come back together)."""

    name = "checkpoint"

    def __init__(self, root: Path):
        self.path = root / "ck"
        self.versions = []
        for v in range(2):
            model = tiny(v)
            opt = AdamW(model, lr=1e-2)
            for _ in range(v + 1):
                for p in model.parameters():
                    p.grad = np.full(p.shape, 0.1 * (v + 1), p.dtype)
                opt.step()
            self.versions.append((model, opt, 10 * v))

    def save(self, v: int) -> None:
        model, opt, step = self.versions[v]
        save_checkpoint(self.path, model, opt, step=step, extra={"version": v})

    def load(self) -> int:
        model = tiny(7)
        opt = AdamW(model, lr=1e-2)
        state = load_checkpoint(self.path, model, opt, restore_rng=False)
        v = state["extra"]["version"]
        ref_model, ref_opt, step = self.versions[v]
        assert state["step"] == step and same(arrays(model), arrays(ref_model))
        got, want = opt.state_dict()["state"], ref_opt.state_dict()["state"]
        assert all(np.array_equal(got[n]["exp_avg"], want[n]["exp_avg"]) for n in want)
        return v


class Adapters:
    """The issue's case: an r=4 LoRA adapter overwritten by an r=8 one (and back)."""

    name = "adapter"

    def __init__(self, root: Path):
        self.path = root / "adapter"
        self.versions = [get_peft_model(tiny(0), LoraConfig(r=r, target_modules=["c_attn"], seed=r,
                                                            init_lora_weights=False)) for r in (4, 8)]
        (root / "adapter").mkdir()
        (root / "adapter" / "e2e_outputs.txt").write_text("kept\n")  # a neighbour the saves must keep

    def save(self, v: int) -> None:
        save_adapter(self.versions[v], self.path)

    def load(self) -> int:
        model = load_adapter(tiny(0), self.path)
        r = model.peft_config["default"].r
        v = (4, 8).index(r)
        ref = self.versions[v].peft_state_dict()
        got = model.peft_state_dict()
        assert same({k: np.asarray(a) for k, a in got.items()}, {k: np.asarray(a) for k, a in ref.items()})
        assert (self.path / "e2e_outputs.txt").read_text() == "kept\n"
        return v


class CachedBases:
    """A cached base (config.json, model.safetensors, meta.json) replaced by another one."""

    name = "cached base"

    def __init__(self, root: Path):
        self.path = pretrained.model_dir("tiny", quick=True)
        assert str(self.path).startswith(str(root))
        self.versions = [(tiny(v), {"version": v, "val_loss": 1.0 + v}) for v in range(2)]

    def save(self, v: int) -> None:
        pretrained._save_atomically(*self.versions[v], self.path)

    def load(self) -> int:
        model, meta = pretrained.load("tiny", quick=True, progress=False, return_meta=True)
        v = meta["version"]
        assert same(arrays(model), arrays(self.versions[v][0]))
        return v


KINDS = [Checkpoints, Adapters, CachedBases]


@pytest.fixture
def kind(request, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrained, "pretrain", lambda *a, **k: pytest.fail("the cached base was lost: "
                                                                            "load() had to pretrain it again"))
    k = request.param(tmp_path)
    k.save(0)
    assert k.load() == 0
    return k


def leftovers(path: Path) -> list[str]:
    """Debris of saves beside ``path`` (temporary, set-aside or nested directories)."""
    return sorted(p.name for p in path.parent.iterdir() if path.name in p.name and p != path)


# ------------------------------------------------------------------ 1. kills


_STEPS = [("os", "replace"), ("os", "rename"), ("os", "fsync"), ("os", "mkdir"), ("os", "link"), ("os", "unlink"),
          ("shutil", "rmtree"), ("safetensors.numpy", "save_file")]


def _die_before_step(k: int) -> None:
    """Patch (in this child only) each file-system step so that the k-th one is never reached: SIGKILL."""
    import importlib

    count = [0]
    for mod_name, fn in _STEPS:
        mod = importlib.import_module(mod_name)
        real = getattr(mod, fn)

        def step(*a, _real=real, **kw):
            count[0] += 1
            if count[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return _real(*a, **kw)

        setattr(mod, fn, step)


def _join(p) -> None:
    p.join(30)
    if p.is_alive():  # a hung child: do not leave it behind
        p.kill()
        p.join()
        pytest.fail("the saving process hung")


def _save_killed_at(kind, k: int) -> None:
    _die_before_step(k)
    kind.save(1)
    os._exit(0)


@pytest.mark.parametrize("kind", KINDS, indirect=True, ids=[k.name for k in KINDS])
def test_a_kill_before_any_step_of_a_save_leaves_a_whole_version(kind):
    """SIGKILL before the 1st, 2nd, ... file-system step of an overwrite, until the save completes."""
    seen = set()
    for k in range(1, 200):
        p = FORK.Process(target=_save_killed_at, args=(kind, k))
        p.start()
        _join(p)
        killed = p.exitcode == -signal.SIGKILL
        assert killed or p.exitcode == 0, p.exitcode
        v = kind.load()  # never lost, never mixed: exactly version 0 or version 1
        seen.add(v)
        if not killed:  # the save went through every step: the new version is there
            assert v == 1
            break
        kind.save(0)  # back to the previous version (also cleans what the kill left)
        assert kind.load() == 0 and not leftovers(kind.path), leftovers(kind.path)
    else:
        pytest.fail("the save never completed")
    assert k > 4 and seen == {0, 1}  # several steps were interrupted, and both outcomes occurred


def _save_forever(kind, ready) -> None:
    kind.save(1)
    ready.set()
    v = 0
    while True:
        kind.save(v)
        v = 1 - v


@pytest.mark.parametrize("kind", KINDS, indirect=True, ids=[k.name for k in KINDS])
def test_a_kill_at_a_random_moment_leaves_a_whole_version(kind):
    t0 = time.perf_counter()
    for v in (1, 0):
        kind.save(v)
    one_save = (time.perf_counter() - t0) / 2
    rng = random.Random(0)
    for _ in range(6):
        ready = FORK.Event()
        p = FORK.Process(target=_save_forever, args=(kind, ready))
        p.start()
        assert ready.wait(30)
        time.sleep(rng.uniform(0, 3 * one_save))
        os.kill(p.pid, signal.SIGKILL)
        _join(p)
        assert kind.load() in (0, 1)


# ------------------------------------------------------------------ 2. damage


def damaged_versions(raw: bytes, rng: random.Random, n_flips: int):
    """(label, bytes): truncations, then single flipped bytes at random places (header and body)."""
    for n in sorted({0, 1, 8, len(raw) // 2, len(raw) - 1}):
        if n < len(raw):
            yield f"cut to {n} bytes", raw[:n]
    for i in rng.sample(range(len(raw)), min(n_flips, len(raw))):
        b = bytearray(raw)
        b[i] ^= 1 << rng.randrange(8)
        yield f"bit flipped at byte {i}", bytes(b)


def check_damage(path: Path, load, original, n_flips=40, config_digest=False):
    """Each damaged version of ``path`` raises an error naming it, or loads exactly ``original``."""
    raw = path.read_bytes()
    outcomes = {"error": 0, "identical": 0}
    for label, data in damaged_versions(raw, random.Random(1), n_flips):
        path.write_bytes(data)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                got = load()
            except (ValueError, FileNotFoundError) as e:
                msg = str(e)
                named = str(path) in msg or (config_digest and any(str(path) in str(w.message) for w in caught))
                assert named, f"{label}: the error does not name {path}: {msg}"
                assert type(e).__name__ in ("DamagedFileError", "ValueError", "FileNotFoundError")
                outcomes["error"] += 1
                continue
            finally:
                path.write_bytes(raw)
        warned = any(str(path) in str(w.message) for w in caught)
        assert got == original or (config_digest and warned), f"{label}: loaded a different model silently"
        outcomes["identical" if got == original else "error"] += 1
    assert outcomes["error"] >= 5, outcomes
    return outcomes


def _checkpoint_fingerprint(path):
    model = tiny(9)
    opt = AdamW(model, lr=1e-2)
    state = load_checkpoint(path, model, opt, restore_rng=False)
    a = arrays(model)
    return (state["step"], state["extra"]["version"], tuple(float(v.sum()) for v in a.values()),
            tuple(float(s["exp_avg"].sum()) for s in opt.state_dict()["state"].values()))


@pytest.mark.parametrize("file", ["model.safetensors", "optimizer.safetensors", "state.json"])
def test_damaged_checkpoint_files_are_named(tmp_path, file):
    ck = Checkpoints(tmp_path)
    ck.save(1)
    original = _checkpoint_fingerprint(ck.path)
    check_damage(ck.path / file, lambda: _checkpoint_fingerprint(ck.path), original)
    with pytest.raises(DamagedFileError, match=r"Delete .*ck and rerun"):
        (ck.path / file).write_bytes(b"{" if file.endswith("json") else b"\x08")
        _checkpoint_fingerprint(ck.path)


def test_files_of_two_saves_do_not_mix(tmp_path):
    """A model file copied in from another save of the same checkpoint is caught (digests in state.json)."""
    ck = Checkpoints(tmp_path)
    ck.save(0)
    other = tmp_path / "other"
    save_checkpoint(other, *ck.versions[1][:2], step=10, extra={"version": 1})
    shutil.copy(other / "model.safetensors", ck.path / "model.safetensors")
    with pytest.raises(DamagedFileError, match=r"model\.safetensors is damaged: it does not belong with state\.json"):
        ck.load()


def _adapter_fingerprint(path):
    model = load_adapter(tiny(0), path)
    cfg = model.peft_config["default"]
    return (cfg.r, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.target_modules),
            tuple((k, float(np.asarray(v).sum())) for k, v in sorted(model.peft_state_dict().items())))


@pytest.mark.parametrize("file", ["adapter_model.safetensors", "adapter_config.json"])
def test_damaged_adapter_files_are_named(tmp_path, file):
    ad = Adapters(tmp_path)
    ad.save(0)
    original = _adapter_fingerprint(ad.path)
    check_damage(ad.path / file, lambda: _adapter_fingerprint(ad.path), original,
                 config_digest=file.endswith(".json"))
    (ad.path / file).write_bytes(b"\xff\xfe")
    with pytest.raises(DamagedFileError, match=r"Resave the adapter"):
        _adapter_fingerprint(ad.path)


def _hf_fingerprint(path):
    model = GPT.from_hf(path)
    return (tuple(sorted(model.config.to_dict().items())),
            tuple((k, float(v.sum())) for k, v in sorted(arrays(model).items())))


@pytest.mark.parametrize("file", ["model.safetensors", "config.json"])
def test_damaged_hugging_face_files_are_named(tmp_path, file):
    tiny(3).save_hf(tmp_path / "hf")
    original = _hf_fingerprint(tmp_path / "hf")
    check_damage(tmp_path / "hf" / file, lambda: _hf_fingerprint(tmp_path / "hf"), original,
                 config_digest=file.endswith(".json"))


def test_a_damaged_cache_entry_is_named_and_rebuilt(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path / "cache"))
    cb = CachedBases(tmp_path)
    cb.save(1)
    rebuilt = []
    monkeypatch.setattr(pretrained, "pretrain", lambda *a, **k: rebuilt.append(1) or cb.versions[0])
    for file, data in (("meta.json", b'{"version": 1, "val_loss": 2.5'), ("meta.json", b"\xe9"),
                       ("model.safetensors", b"13 bytes only"), ("config.json", b"")):
        cb.save(1)
        (cb.path / file).write_bytes(data)
        model = pretrained.load("tiny", quick=True, progress=False)
        out = capsys.readouterr().out
        assert "damaged" in out and str(cb.path / file) in out and "pretraining it again" in out, out
        assert same(arrays(model), arrays(cb.versions[0][0]))
    assert len(rebuilt) == 4


# ------------------------------------------------------------------ 3. resume


def _run(tmp_path, resume, steps=6):
    rng_data = np.random.default_rng(0)
    data = rng_data.integers(0, 40, size=400)

    def batch(rng):
        i = rng.integers(0, len(data) - 9, size=2)
        return np.stack([data[j:j + 8] for j in i]), np.stack([data[j + 1:j + 9] for j in i])

    cfg = TrainConfig(max_steps=steps, batch_size=2, lr=1e-2, warmup_steps=0, checkpoint_every=2,
                      checkpoint_dir=str(tmp_path / "cks"), progress=False)
    return train(tiny(0).train(), batch, config=cfg, resume=resume)


def test_resume_auto_skips_a_damaged_newest_checkpoint(tmp_path):
    _run(tmp_path, False)
    newest = checkpoint_path(tmp_path / "cks", 6)
    raw = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(raw[:-1] + bytes([raw[-1] ^ 4]))  # one changed byte
    for resume in ("auto", True):
        with pytest.warns(UserWarning, match=r"skipping checkpoint .*step_00000006.*model\.safetensors is damaged"):
            result = _run(tmp_path, resume, steps=8)
        assert result.resumed_from == 4, result.resumed_from
        (newest / "model.safetensors").write_bytes(raw[:-1] + bytes([raw[-1] ^ 4]))
        shutil.rmtree(checkpoint_path(tmp_path / "cks", 8))


def test_resume_auto_with_only_damaged_checkpoints_starts_afresh(tmp_path):
    _run(tmp_path, False, steps=2)
    (checkpoint_path(tmp_path / "cks", 2) / "state.json").write_text("{")
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        result = _run(tmp_path, "auto", steps=2)
    assert result.resumed_from is None and len(result.history) == 2
    (checkpoint_path(tmp_path / "cks", 2) / "state.json").write_text("{")  # the fresh run saved step 2 again
    with pytest.warns(UserWarning, match="skipping checkpoint"), pytest.raises(FileNotFoundError,
                                                                               match="no intact"):
        _run(tmp_path, True, steps=2)


def test_a_fresh_run_into_a_used_checkpoint_dir_warns(tmp_path):
    _run(tmp_path, False, steps=4)
    with pytest.warns(UserWarning, match=r"already holds checkpoints of another run .*resume='auto'"):
        _run(tmp_path, False, steps=2)
