"""The QLoRA lesson (the README's main job) runs in quick mode and its numbers hold together."""
import math

from minipeft.lessons import qlora


def test_qlora_lesson_quick(tmp_path):
    r = qlora.main(["--quick", "--figures", str(tmp_path), "--json", str(tmp_path / "r.json")])
    m = r["methods"]
    assert set(m) == {"full", "lora", "qlora"}
    for name, row in m.items():
        assert math.isfinite(row["val_loss"]) and row["val_loss"] < r["base_val_loss"], name
    # LoRA and QLoRA train the same adapter; QLoRA stores the frozen base in 4 bits
    assert m["lora"]["trainable"] == m["qlora"]["trainable"] < m["full"]["trainable"]
    assert m["qlora"]["measured"]["weights_frozen"] < m["lora"]["measured"]["weights_frozen"] / 2
    assert m["qlora"]["measured"]["quant_constants"] > 0
    assert r["max_memory_deviation"] < 0.10  # measured within 10% of the calculator
    assert abs(m["qlora"]["val_loss"] - m["lora"]["val_loss"]) < 0.1
    states = {row[0]: row for row in r["optimizers"]}
    assert states["AdamW8bit"][1] < states["AdamW (32-bit)"][1] / 2
    assert states["PagedAdamW"][2] < states["PagedAdamW"][1]  # less state on the device than in all
    merge = r["merge"]
    assert abs(merge["merged into the dequantized NF4 base"] - merge["QLoRA as trained (NF4 base + LoRA)"]) < 1e-3
    assert (tmp_path / "qlora_loss.png").exists() and (tmp_path / "qlora_memory.png").exists()
