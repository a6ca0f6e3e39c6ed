"""User errors at the command lines: one line on stderr, exit code 2, before any work is done."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minipeft import pretrain
from minipeft.lessons import e2e_eval
from minipeft.data.e2e import load_e2e_csv
from minipeft.lessons._common import parse_args

ROOT = Path(__file__).resolve().parents[1]


def one_line_exit_2(capsys, run, *needles) -> str:
    with pytest.raises(SystemExit, match="^2$"):  # str(SystemExit) is its exit code
        run()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err  # one line, no traceback
    for n in needles:
        assert n in err, err
    return err


# ------------------------------------------------------------------ pretrain


@pytest.mark.parametrize("argv, needle", [
    (["--device", "tpu"], "--device tpu: unknown device 'tpu'"),
    (["--steps", "0"], "--steps 0: must be a positive"),
    (["--seed", "-1"], "--seed -1: must be >= 0"),
    (["--corpus", "/no/such/file.txt"], "no such file"),
])
def test_pretrain_user_errors_are_one_line(capsys, argv, needle, monkeypatch):
    monkeypatch.setattr(pretrain.pretrained, "pretrain", lambda *a, **k: pytest.fail("work started"))
    one_line_exit_2(capsys, lambda: pretrain.main(argv + ["--quick"]), needle)


def test_pretrain_refuses_an_unwritable_cache_before_training(capsys, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path / "file" / "cache"))
    monkeypatch.setattr(pretrain.pretrained, "pretrain", lambda *a, **k: pytest.fail("work started"))
    one_line_exit_2(capsys, lambda: pretrain.main(["--quick"]), "cannot save the model", "MINIPEFT_CACHE")


def test_pretrain_bad_device_from_a_shell_prints_no_traceback():
    r = subprocess.run([sys.executable, "-m", "minipeft.pretrain", "--device", "tpu"], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"}, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


# ------------------------------------------------------------------ evaluate --out


@pytest.mark.parametrize("out", ["file/out.txt", "file/deeper/out.txt", "."])
def test_evaluate_checks_out_before_decoding(capsys, monkeypatch, tmp_path, out):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(e2e_eval, "load_model", lambda *a, **k: pytest.fail("work started"))
    one_line_exit_2(capsys, lambda: e2e_eval.main(["--base", "tiny", "--out", str(tmp_path / out)]), "--out")


def test_evaluate_checks_json_before_decoding(capsys, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(e2e_eval, "load_model", lambda *a, **k: pytest.fail("work started"))
    one_line_exit_2(capsys, lambda: e2e_eval.main(["--base", "tiny", "--out", str(tmp_path / "o.txt"),
                                                   "--json", str(tmp_path / "file" / "s.json")]), "--json")


# ------------------------------------------------------------------ lessons' common flags


@pytest.mark.parametrize("argv, needle", [
    (["--json", "{f}/r.json"], "--json"),  # the parent is a file
    (["--json", "{d}"], "is a directory"),
    (["--figures", "{f}/figs"], "--figures"),
    (["--figures", "{f}"], "is a file"),
    (["--seed", "-1"], "--seed -1: must be >= 0"),
    (["--device", "tpu"], "unknown device"),
])
def test_lesson_flags_are_checked_before_any_work(capsys, tmp_path, argv, needle):
    (tmp_path / "file").write_text("x")
    argv = [a.format(f=tmp_path / "file", d=tmp_path) for a in argv]
    one_line_exit_2(capsys, lambda: parse_args(argv + ["--quick"], "a lesson"), needle)


def test_lesson_flags_that_can_be_written_pass(tmp_path):
    args = parse_args(["--quick", "--json", str(tmp_path / "new" / "r.json"), "--figures", str(tmp_path / "f"),
                       "--seed", "3"], "a lesson")
    assert args.seed == 3 and args.json.name == "r.json"
    assert not (tmp_path / "new").exists()  # checked, not created: a failed run leaves nothing


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_lesson_json_into_a_read_only_folder(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        one_line_exit_2(capsys, lambda: parse_args(["--json", str(ro / "r.json")], "a lesson"), "not writable")
    finally:
        ro.chmod(0o700)


# ------------------------------------------------------------------ E2E CSV


def test_non_utf8_e2e_csv_names_the_file_and_the_fix(tmp_path):
    p = tmp_path / "latin1.csv"
    p.write_bytes("mr,ref\n\"name[Caf\xe9 Rouge]\",\"A caf\xe9.\"\n".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8 text") as info:
        load_e2e_csv(p)
    msg = str(info.value)
    assert str(p) in msg and "not UTF-8" in msg and "line 2" in msg and "0xe9" in msg and "iconv" in msg


def test_malformed_mr_names_the_file_and_line(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text('mr,ref\n"name[A]","x"\n"name[B", "y"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.csv line 3: cannot parse MR"):
        load_e2e_csv(p)
