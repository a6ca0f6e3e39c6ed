"""The E2E evaluation command (python -m minipeft.lessons.e2e_eval): adapters and bases from files, any E2E CSV,
outputs one line per MR, scores as JSON, clear errors; position extension."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from minipeft.lessons.e2e_eval import e2e_splits, extend_positions, load_model, main
from minipeft.data.e2e import synthetic_e2e
from minipeft.gpt import GPT, GPTConfig
from minipeft.peft import FullFineTuningConfig, LoraConfig, get_peft_model, save_adapter

DEVSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e" / "devset.csv"
ROWS = [("name[The Eagle], eatType[pub], area[riverside]", "The Eagle is a pub by the river."),
        ("name[The Eagle], eatType[pub], area[riverside]", "The Eagle pub is in the riverside area."),
        ("name[Blue Spice], food[Chinese]", "Blue Spice serves Chinese food."),
        ("name[Zizzi], priceRange[cheap], near[Cafe Rouge]", "Zizzi is cheap, near Cafe Rouge.")]


def write_csv(path, rows, header=("mr", "ref")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small byte-level base saved as a Hugging Face directory and a LoRA adapter naming it."""
    root = tmp_path_factory.mktemp("e2e_eval")
    base = GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2, block_size=200), seed=0)
    base.save_hf(root / "base")
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, seed=1))
    save_adapter(model, root / "lora", base_model_name_or_path=str(root / "base"))
    return root


def test_cli_on_a_csv_it_has_never_seen(saved, tmp_path, capsys):
    data = write_csv(tmp_path / "mine.csv", ROWS)
    out = tmp_path / "out" / "hyps.txt"
    res = main(["--adapter", str(saved / "lora"), "--data", str(data), "--beam", "2", "--max-new-tokens", "6",
                "--out", str(out)])
    lines = out.read_text(encoding="utf-8").split("\n")
    assert len(lines) == 3 + 1 and lines[-1] == ""  # one line per distinct MR (the first two rows share one)
    js = json.loads(out.with_suffix(".json").read_text())
    assert js["n_mrs"] == res["n_mrs"] == 3
    assert set(js["scores"]) == {"BLEU", "NIST", "ROUGE_L", "CIDEr"}
    assert all(np.isfinite(v) for v in js["scores"].values())
    printed = capsys.readouterr().out
    assert "BLEU" in printed and "CIDEr" in printed and "(3 MRs)" in printed


def test_cli_greedy_base_alone_and_explicit_base(saved, tmp_path):
    data = write_csv(tmp_path / "mine.csv", ROWS)
    res = main(["--base", str(saved / "base"), "--data", str(data), "--beam", "1", "--max-new-tokens", "4",
                "--out", str(tmp_path / "o.txt"), "--json", str(tmp_path / "s.json")])
    assert res["adapter"] is None and (tmp_path / "s.json").is_file()


@pytest.mark.skipif(not DEVSET.is_file(), reason="../shared/data/e2e/devset.csv not present")
def test_cli_on_the_real_devset_subset(saved, tmp_path):
    res = main(["--adapter", str(saved / "lora"), "--data", str(DEVSET), "--limit", "4", "--beam", "2",
                "--max-new-tokens", "3", "--out", str(tmp_path / "dev.txt")])
    assert res["n_mrs"] == 4
    assert len((tmp_path / "dev.txt").read_text(encoding="utf-8").splitlines()) == 4


@pytest.mark.parametrize("case,message", [
    ("missing_csv", "no E2E CSV"),
    ("not_e2e", "expected columns 'mr' and 'ref'"),
    ("missing_adapter", "adapter directory"),
    ("no_base", "no base model"),
])
def test_cli_clear_errors(saved, tmp_path, capsys, case, message):
    data = write_csv(tmp_path / "ok.csv", ROWS)
    args = {"missing_csv": ["--adapter", str(saved / "lora"), "--data", str(tmp_path / "nope.csv")],
            "not_e2e": ["--adapter", str(saved / "lora"),
                        "--data", str(write_csv(tmp_path / "bad.csv", [("1", "2")], header=("a", "b")))],
            "missing_adapter": ["--adapter", str(tmp_path / "nothing"), "--data", str(data)],
            "no_base": ["--data", str(data)]}[case]
    with pytest.raises(SystemExit, match="^2$"):  # str(SystemExit) is its exit code
        main(args + ["--out", str(tmp_path / "x.txt")])
    assert message in capsys.readouterr().err


def test_extend_positions_keeps_outputs_and_full_adapter_brings_its_length(tmp_path):
    m = GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2, block_size=8), seed=0)
    x = np.arange(6)[None, :] % 7
    big = extend_positions(m, 20)
    assert big.config.block_size == 20
    assert np.array_equal(big(x).logits.data, m(x).logits.data)
    w = big.transformer.wpe.weight.data
    assert np.array_equal(w[8:16], w[:8]) and np.array_equal(w[16:], w[:4])
    with pytest.raises(ValueError, match="smaller"):
        extend_positions(m, 4)
    m.save_hf(tmp_path / "base")  # 8 positions on disk; the FULL adapter holds a 20-row table
    full = get_peft_model(big, FullFineTuningConfig())
    save_adapter(full, tmp_path / "full", base_model_name_or_path=str(tmp_path / "base"))
    loaded = load_model(str(tmp_path / "full"))
    assert loaded.config.block_size == 20
    assert np.allclose(loaded(x).logits.data, m(x).logits.data)


def test_splits_are_by_mr():
    data = synthetic_e2e(50, seed=3)
    tr, va, te = e2e_splits(data, seed=3)
    assert len(tr) + len(va) + len(te) == 50
    assert not (set(tr.mrs) & set(va.mrs) or set(tr.mrs) & set(te.mrs) or set(va.mrs) & set(te.mrs))
