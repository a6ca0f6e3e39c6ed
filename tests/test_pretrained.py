"""python -m minipeft.pretrain on a text file nobody prepared, and its errors."""
import math
from pathlib import Path

import numpy as np
import pytest

from minipeft import pretrain, pretrained


def _some_text(path, n_bytes=60_000):
    rng = np.random.default_rng(0)
    words = ["the", "model", "learns", "bytes", "of", "text", "and", "then", "it", "predicts", "next"]
    lines = [" ".join(rng.choice(words, size=12)) + "." for _ in range(n_bytes // 60)]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def test_pretrain_cli_on_any_text_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path / "cache"))
    f = _some_text(tmp_path / "any.txt")
    meta = pretrain.main(["--size", "tiny", "--corpus", str(f), "--quick", "--steps", "60"])
    out = capsys.readouterr().out
    assert "unigram baseline" in out and "validation loss after training" in out
    assert math.isfinite(meta["val_loss"]) and meta["val_loss"] < meta["val_loss_before"]
    # this text is very regular: even 60 steps beat the unigram model on it
    assert meta["val_loss"] < meta["unigram_val_loss"]
    # a non-default step count is cached apart: it never replaces the base the lessons load
    assert (pretrained.model_dir("tiny", str(f), quick=True, steps=60) / "model.safetensors").exists()
    assert not pretrained.model_dir("tiny", str(f), quick=True).exists()


def test_pretrain_cli_rejects_missing_corpus(tmp_path, capsys):
    with pytest.raises(SystemExit, match="^2$"):  # a user error: exit code 2
        pretrain.main(["--corpus", str(tmp_path / "does_not_exist.txt"), "--quick"])
    assert "no such file, and not a built-in corpus name" in capsys.readouterr().err


def test_unknown_size():
    with pytest.raises(ValueError, match="unknown pretrained size"):
        pretrained.pretrain("enormous", quick=True)


def test_every_base_knows_exactly_the_positions_it_was_pretrained_on():
    from minipeft.gpt import GPTConfig

    for name, spec in pretrained.SIZES.items():
        assert GPTConfig.preset(name).block_size == spec.block_size, name
        for quick in (False, True):  # quick models too: windows as long as the table
            assert pretrained._spec(name, quick, None).block_size == spec.block_size
    assert pretrained.SIZES["tiny-512"].block_size >= 512 and pretrained.SIZES["small"].block_size >= 512


def test_interrupted_save_keeps_the_previous_model(tmp_path, monkeypatch):
    """A kill while the new weights are written leaves the cached model whole and loadable."""
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path / "cache"))
    f = _some_text(tmp_path / "any.txt")
    model, meta = pretrained.pretrain("tiny", str(f), quick=True, steps=3, progress=False)
    d = pretrained.model_dir("tiny", str(f), quick=True, steps=3)
    before = (d / "model.safetensors").read_bytes()

    def killed(self, path):
        (Path(path) / "model.safetensors").write_bytes(b"13 bytes only")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(pretrained.GPT, "save_hf", killed)
    with pytest.raises(KeyboardInterrupt, match="killed while saving"):
        pretrained.pretrain("tiny", str(f), quick=True, steps=3, progress=False)
    assert (d / "model.safetensors").read_bytes() == before and (d / "meta.json").exists()
    assert not [p for p in d.parent.iterdir() if ".tmp-" in p.name]  # no debris left beside it


def test_damaged_cache_is_rebuilt(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrained, "QUICK_STEPS", 12)
    pretrained.load("tiny", quick=True, progress=False)
    d = pretrained.model_dir("tiny", quick=True)
    (d / "model.safetensors").write_bytes(b"garbage")
    model = pretrained.load("tiny", quick=True, progress=False)
    assert "damaged" in capsys.readouterr().out and model.num_parameters() > 0
