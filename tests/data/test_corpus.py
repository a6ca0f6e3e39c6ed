"""Tests for minipeft/data/corpus.py: the local-Python corpus and user text files."""
import ast
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from minipeft.data import corpus as C
from minipeft.data.corpus import Corpus, load_corpus, load_mixture, load_text_file, strip_docstrings


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Build into a fresh cache so the tests exercise building, not a stale cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MINIPEFT_CACHE", str(tmp_path_factory.mktemp("minipeft-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def english_docs():
    return C.english_documents()


@pytest.fixture(scope="module")
def python_docs():
    return C.python_documents()


def _has_headers():
    return any(Path(sysconfig.get_paths()["include"]).rglob("*.h"))


# ---- pieces ---------------------------------------------------------------------------------
def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path))
    assert C.cache_dir() == tmp_path
    monkeypatch.delenv("MINIPEFT_CACHE")
    assert C.cache_dir() == Path.home() / ".cache" / "minipeft"


def test_stdlib_files_are_library_source_only():
    rels = [rel for rel, _ in C.stdlib_files()]
    assert rels == sorted(rels) and "os.py" in rels and "email/utils.py" in rels
    for rel in rels:
        parts = rel.split("/")
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts), rel
    assert "pydoc_data/topics.py" not in rels


def test_strip_docstrings_cases():
    src = ('"""module doc"""\nimport os\n'
           'def café(): "doc"; return 1\n'
           'class A:\n    """a"""\n    "second string"\n    x = 1  # keep me\n'
           'def g():\n    """only statement"""\n'
           'async def h():\n    r"""raw""" # trailing\n    return 1\n')
    out = strip_docstrings(src)
    assert out == ("import os\ndef café(): pass; return 1\nclass A:\n    x = 1  # keep me\n"
                   "def g():\n    pass\nasync def h():\n    return 1\n")
    assert strip_docstrings(out) == out  # nothing left to strip
    with pytest.raises(SyntaxError, match="invalid syntax"):
        strip_docstrings("def (:")


def test_clean_docstring():
    text = C.clean_docstring("""Return the sum of the numbers in the list, ignoring None.

        >>> total([1, None, 2])
        3

        The order of the values does not matter.""")
    assert ">>>" not in text and text.endswith("does not matter.")
    assert "\n    " not in text  # dedented
    assert C.clean_docstring("Return self.") is None  # too short
    assert C.clean_docstring("x = {'a': [1, 2, 3], 'b': (4, 5, 6)} # " * 3) is None  # not prose


def test_split_is_by_group_and_deterministic():
    docs = [C.Document(f"g{i % 50}", f"text {i}") for i in range(500)]
    train, val = C.split_documents(docs)
    assert len(train) + len(val) == 500
    assert not {d.group for d in train} & {d.group for d in val}
    assert 0 < len(val) < len(train)
    assert C.split_documents(docs) == (train, val)
    assert all(0.0 <= C.group_hash(d.group) < 1.0 for d in docs)


# ---- the domains ----------------------------------------------------------------------------
def test_english_corpus(english_docs):
    from pydoc_data.topics import topics

    pages = {t.strip() for t in topics.values()}
    assert {d.text for d in english_docs if d.group.startswith("pydoc:")} == pages
    assert len({d.text for d in english_docs}) == len(english_docs)  # deduplicated
    train, val = C.split_documents(english_docs)
    assert not {d.group for d in train} & {d.group for d in val}
    # the cached build is the same text as this independent second build: deterministic
    assert load_corpus("english", "train") == C.DOC_SEPARATOR.join(d.text for d in train)
    assert load_corpus("english", "val") == C.DOC_SEPARATOR.join(d.text for d in val)
    text = load_corpus("english", "train", max_bytes=200_000)
    prose = sum(c.isalpha() or c == " " for c in text) / len(text)
    assert prose > 0.75
    doctest_line = re.compile(r"^\s*>>>", re.M)  # doctest examples are dropped from docstrings
    assert not any(doctest_line.search(d.text) for d in english_docs if not d.group.startswith("pydoc:"))


def test_python_corpus_has_no_docstrings(python_docs):
    train, val = C.split_documents(python_docs)
    assert not {d.group for d in train} & {d.group for d in val}
    assert load_corpus("python", "val") == C.DOC_SEPARATOR.join(d.text for d in val)
    full = load_corpus("python", "train")
    assert full == C.DOC_SEPARATOR.join(d.text for d in train)
    # no def/class line is followed directly by a triple-quoted string
    pattern = re.compile(r"^\s*(?:async\s+def|def|class)\s[^\n]*:[ \t]*\n\s*[rRbBuU]{0,2}(\"\"\"|''')", re.M)
    assert pattern.search(full) is None
    for d in python_docs[::10]:  # a sample parses and has no docstring anywhere
        tree = ast.parse(d.text)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                assert ast.get_docstring(node) is None, (d.group, getattr(node, "name", "<module>"))
    assert "def " in full and "import " in full


@pytest.mark.skipif(not _has_headers(), reason="this Python has no C headers")
def test_c_and_text_plus_other_code():
    c = load_corpus("c", "train", max_bytes=20_000)
    assert "#define" in c or "#include" in c
    mix = C.load_text_and_other_code("train", max_bytes=40_000, code_fraction=0.5)
    assert mix.startswith(load_corpus("english", "train", max_bytes=20_000))
    assert mix.endswith(c)
    assert load_corpus("text+other-code", "val") == load_corpus("english+c", "val")
    with pytest.raises(ValueError, match="code_fraction"):
        C.load_text_and_other_code(code_fraction=1.5)


def test_max_bytes_and_mixtures():
    full = load_corpus("english", "train")
    for n in (1, 999, 12_345):
        part = load_corpus("english", "train", max_bytes=n)
        assert n - 4 < len(part.encode("utf-8")) <= n and full.startswith(part)
    assert load_corpus("english", "train", max_bytes=10**12) == full
    mix = load_mixture(["english", "python"], "train", max_bytes=40_000, weights=[1, 3])
    eng = load_corpus("english", "train", max_bytes=10_000)
    assert mix.startswith(eng + C.DOC_SEPARATOR)
    assert mix[len(eng) + 2:] == load_corpus("python", "train", max_bytes=30_000)
    natural = load_corpus("mixed", "val")
    sizes = [len(load_corpus(d, "val").encode()) for d in ("english", "python")]
    assert abs(len(natural.encode()) - sum(sizes) - 2) <= 8
    stats = C.corpus_stats("mixed")
    assert stats["english"]["train"]["bytes"] == len(full.encode("utf-8"))
    assert stats["python"]["val"]["bytes"] == sizes[1]


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "klingon"}, "unknown corpus"),
    ({"name": "english+english"}, "unknown corpus"),
    ({"split": "test"}, "split must be"),
    ({"max_bytes": 0}, "max_bytes"),
    ({"max_bytes": 1.5}, "max_bytes"),
    ({"max_bytes": True}, "max_bytes"),
])
def test_load_corpus_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_corpus(**kwargs)


def test_bad_mixture_weights():
    with pytest.raises(ValueError, match="weights"):
        load_mixture(["english", "python"], weights=[1.0])
    with pytest.raises(ValueError, match="weights"):
        load_mixture(["english", "python"], weights=[-1.0, 2.0])


# ---- user files and token arrays ------------------------------------------------------------
def test_load_text_file(tmp_path):
    text = "".join(f"line {i}: some words here\n" for i in range(200))
    path = tmp_path / "any.txt"
    path.write_text(text, encoding="utf-8")
    train, val = load_text_file(path, val_fraction=0.1)
    assert train + val == text and val.startswith("line ")
    assert abs(len(val) / len(text) - 0.1) < 0.02
    assert load_text_file(str(path)) == (train, val)  # str path, deterministic
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("ab", encoding="utf-8")
    assert load_text_file(tiny) == ("a", "b")


def test_load_text_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_file(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="directory"):
        load_text_file(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_text_file(empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_text_file(latin)
    with pytest.raises(ValueError, match="val_fraction"):
        load_text_file(latin, val_fraction=1.0)


def test_corpus_object(tmp_path):
    c = Corpus.load("english", max_bytes=50_000, val_max_bytes=5_000)
    assert c.train.dtype == np.int64 and 49_990 < len(c.train) <= 50_000 and len(c.val) <= 5_000
    assert c.vocab_size == 259 and c.train.max() < 256
    assert 0.0 < c.unigram_baseline() < np.log(256)
    path = tmp_path / "mine.txt"
    path.write_text("hello world\n" * 100, encoding="utf-8")
    mine = Corpus.load(str(path), val_fraction=0.2)
    assert mine.tokenizer.decode(np.concatenate([mine.train, mine.val])) == "hello world\n" * 100
    with pytest.raises(FileNotFoundError, match="built-in corpus name"):
        Corpus.load(str(tmp_path / "nope.txt"))
