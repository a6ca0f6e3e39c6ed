"""minipeft.atomic: directories and files replaced whole, neighbours kept, killed saves recovered."""
import os
from pathlib import Path

import numpy as np
import pytest

from minipeft.atomic import (atomic_directory, check_writable_dir, recover, remove_directory, write_bytes_atomic,
                             write_text_atomic)
from minipeft.checkpoint import checkpoint_path, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from minipeft.gpt import GPT, GPTConfig
from minipeft.peft import LoraConfig, get_peft_model, load_adapter, save_adapter


def tiny(seed=0):
    return GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=8), seed=seed).eval()


def debris(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_the_new_version_replaces_the_old_whole(tmp_path):
    target = tmp_path / "d"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
        (tmp / "b").write_text("1")
    with atomic_directory(target) as tmp:
        assert not target.joinpath("c").exists() and tmp.parent == tmp_path and tmp.name.startswith(".d.tmp-")
        (tmp / "a").write_text("2")
        (tmp / "c").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["a", "c"]  # owned=None: b is gone with the old version
    assert (target / "a").read_text() == "2" and debris(tmp_path) == []
    assert target.stat().st_mode & 0o777 == 0o777 & ~_umask()  # an ordinary directory, not mkdtemp's 0700


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_an_error_while_writing_leaves_the_previous_version_and_no_debris(tmp_path):
    target = tmp_path / "d"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(KeyboardInterrupt, match="killed while writing"):
        with atomic_directory(target, owned=["a"]) as tmp:
            (tmp / "a").write_text("half")
            raise KeyboardInterrupt("killed while writing")
    assert (target / "a").read_text() == "old" and debris(tmp_path) == []


def test_entries_it_does_not_own_are_carried_over(tmp_path):
    target = tmp_path / "d"
    with atomic_directory(target) as tmp:
        (tmp / "mine").write_text("1")
        (tmp / "theirs.txt").write_text("keep")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x").write_text("keep too")
        (tmp / "gone").write_text("owned, not rewritten: dropped")
    with atomic_directory(target, owned=["mine", "gone"]) as tmp:
        (tmp / "mine").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["mine", "sub", "theirs.txt"]
    assert (target / "sub" / "x").read_text() == "keep too" and (target / "mine").read_text() == "2"


def test_saving_the_default_adapter_keeps_the_other_adapters_and_outputs(tmp_path):
    model = get_peft_model(tiny(), LoraConfig(r=2, init_lora_weights=False, seed=1))
    model.add_adapter("other", LoraConfig(r=4, init_lora_weights=False, seed=2))
    save_adapter(model, tmp_path / "ad", "other")  # -> ad/other/
    (tmp_path / "ad" / "e2e_outputs.txt").write_text("outputs\n")
    save_adapter(model, tmp_path / "ad")  # the default adapter, in ad/ itself, written after
    save_adapter(model, tmp_path / "ad")  # and overwritten
    assert (tmp_path / "ad" / "e2e_outputs.txt").read_text() == "outputs\n"
    assert load_adapter(tiny(), tmp_path / "ad", "other").peft_config["other"].r == 4
    assert load_adapter(tiny(), tmp_path / "ad").peft_config["default"].r == 2


def test_a_kill_between_the_two_renames_is_recovered_on_load(tmp_path):
    net = tiny(3)
    path = save_checkpoint(tmp_path / "step_00000005", net, step=5)
    os.replace(path, tmp_path / ".step_00000005.old-123-abcd")  # what a kill after rename (1) leaves
    assert latest_checkpoint(tmp_path) == path and path.is_dir()  # list_checkpoints put it back
    os.replace(path, tmp_path / ".step_00000005.old-123-abcd")
    other = tiny(4)
    assert load_checkpoint(path, other, restore_rng=False)["step"] == 5  # and so does load_checkpoint
    assert all(np.array_equal(a, b) for a, b in zip(other.state_dict().values(), net.state_dict().values()))
    assert not recover(path)  # nothing left to recover


def test_the_next_save_removes_what_killed_saves_left(tmp_path):
    target = tmp_path / "d"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    dead = 999_999_999  # no such process
    for name in (f".d.tmp-{dead}-aa", f".d.old-{dead}-bb", f".d.del-{dead}-cc", f"..d.tmp-{dead}-aa.tmp-{dead}-dd"):
        (tmp_path / name).mkdir()
    (tmp_path / ".e.tmp-1-ee").mkdir()  # another target's: not ours to remove
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("2")
    assert debris(tmp_path) == [".e.tmp-1-ee"]


def test_refusals(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        with atomic_directory(tmp_path / "file"):
            pass
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="current working directory"):
        with atomic_directory(tmp_path):
            pass
    with pytest.raises(ValueError, match="current working directory"):
        save_adapter(get_peft_model(tiny(), LoraConfig(r=2)), ".")


def test_a_symlinked_target_keeps_its_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with atomic_directory(tmp_path / "link") as tmp:
        (tmp / "a").write_text("1")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "a").read_text() == "1"


def test_single_files_and_removal(tmp_path):
    write_text_atomic(tmp_path / "new" / "r.json", '{"a": 1}')
    write_bytes_atomic(tmp_path / "new" / "r.json", b'{"a": 2}')
    assert (tmp_path / "new" / "r.json").read_text() == '{"a": 2}' and debris(tmp_path / "new") == []
    for s in (2, 4):
        save_checkpoint(checkpoint_path(tmp_path / "cks", s), tiny(), step=s)
    remove_directory(checkpoint_path(tmp_path / "cks", 2))
    assert [s for s, _ in list_checkpoints(tmp_path / "cks")] == [4] and debris(tmp_path / "cks") == []


def test_check_writable_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    assert check_writable_dir(tmp_path / "a" / "b") is None and not (tmp_path / "a").exists()
    assert "is a file, not a folder" in check_writable_dir(tmp_path / "file")
    assert "cannot be made" in check_writable_dir(tmp_path / "file" / "sub")
