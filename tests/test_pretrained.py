"""python -m minipeft.pretrain on a text file nobody prepared, and its errors."""
import math

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
    assert (pretrained.model_dir("tiny", str(f), quick=True) / "model.safetensors").exists()


def test_pretrain_cli_rejects_missing_corpus(tmp_path):
    with pytest.raises(SystemExit):
        pretrain.main(["--corpus", str(tmp_path / "does_not_exist.txt"), "--quick"])


def test_unknown_size():
    with pytest.raises(ValueError, match="unknown pretrained size"):
        pretrained.pretrain("enormous", quick=True)
