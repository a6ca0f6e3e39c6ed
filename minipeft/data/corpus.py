"""Pretraining text built from the local Python installation: nothing is downloaded.

Three *domains*, each a list of documents read from this Python's own files:

- ``english``: the reference pages behind ``help()`` (``pydoc_data.topics``, sorted by
  topic) and the docstrings of the standard library's ``.py`` sources, read with
  :mod:`ast` (modules are parsed, never imported), dedented, doctest examples dropped,
  and kept only when they look like prose.
- ``python``: the same standard-library sources with every module, class and function
  docstring cut out (comments and formatting are kept), so that the code domain and
  the English domain do not share text.
- ``c``: the C headers of this Python (``sysconfig.get_paths()['include']``), a second,
  non-Python kind of code. Hernandez et al. (2021), *Scaling Laws for Transfer*, compare
  pretraining on text with pretraining on "text plus non-Python code" before fine-tuning
  on Python; ``english+c`` is that mixture.

Names join domains with ``+`` (``english+python``); ``mixed`` means ``english+python``.

Each document belongs to a *group* (its source file, or its pydoc topic); a group goes
to validation when ``sha256(group)`` falls in the lowest ``VAL_FRACTION`` of the hash
range, so train and validation never share a file, and a module's docstrings and its
code land on the same side. Documents are ordered by that same hash, so any prefix
(``max_bytes``) samples the whole library instead of its first modules alphabetically.
The result depends only on the Python version; it is built once (a few seconds) and
cached under ``$MINIPEFT_CACHE/corpus`` (default ``~/.cache/minipeft/corpus``).

How large: ``english`` is all the English prose a stock Python carries, and so the largest and
most prose-like text a machine with nothing downloaded is sure to have: on CPython 3.11.7,
1,973,676 training and 120,844 validation bytes (6,902 documents); on 3.12 (the H200 runs),
1,679,508 and 101,065 (``corpus_stats('english')`` prints the counts). Other text -- a book, a
web crawl -- goes through ``load_text_file`` (``python -m minipeft.pretrain --corpus FILE``).
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import io
import json
import os
import re
import sys
import sysconfig
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..atomic import write_text_atomic
from .tokenizer import ByteTokenizer

CORPUS_FORMAT = 3  # bump when the builder changes: it is part of the cache key
VAL_FRACTION = 0.1  # share of groups (files/topics) held out for validation
DOC_SEPARATOR = "\n\n"  # written between documents
MIN_DOCSTRING_CHARS = 40  # shorter docstrings ("Return self.") say little English
MIN_PROSE_FRACTION = 0.75  # letters and spaces over all characters, for a docstring to count as prose
DOMAINS = ("english", "python", "c")
ALIASES = {"mixed": "english+python", "text+other-code": "english+c"}
SPLITS = ("train", "val")

# path parts under the stdlib directory that are not library source
_SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
               "lib-dynload", "_bundled"}
# files that are data rather than code: English topics (already in `english`), build-specific
# config, and the 1.3 MB of generated charmap tables under encodings/
_SKIP_FILE = re.compile(r"^(pydoc_data/topics\.py|_sysconfigdata.*|config-.*)$")
_CHARMAP_MARK = b"Python Character Mapping Codec"


@dataclass(frozen=True)
class Document:
    """One piece of text and the group (file or topic) that decides its split."""

    group: str  # e.g. "email/utils.py" or "pydoc:for"
    text: str


def cache_dir() -> Path:
    """minipeft's cache: ``$MINIPEFT_CACHE``, or ``~/.cache/minipeft``."""
    env = os.environ.get("MINIPEFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "minipeft"


def python_tag() -> str:
    """Cache key of the corpus: interpreter, exact version and builder format."""
    v = sys.version_info
    return f"{sys.implementation.name}-{v.major}.{v.minor}.{v.micro}-v{CORPUS_FORMAT}"


def group_hash(group: str) -> float:
    """A number in [0, 1) fixed by the group name (sha256), used to split and to order."""
    return int.from_bytes(hashlib.sha256(group.encode("utf-8")).digest()[:8], "big") / 2.0**64


# ---- reading the standard library ------------------------------------------------------
def stdlib_files() -> list[tuple[str, Path]]:
    """``(relative path, path)`` of the standard library's own ``.py`` files, sorted.

    Tests, site-packages, bundled wheels, build-specific files and generated codec
    tables are left out.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # prune skipped folders instead of walking site-packages and test/ only to drop them
        dirnames[:] = [d for d in dirnames if d not in _SKIP_PARTS and not d.startswith("config-")]
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if name.endswith(".py") and not _SKIP_FILE.match(rel):
                out.append((rel, root / rel))
    return sorted(out)


def _read_source(path: Path) -> str | None:
    """Source text honoring its coding cookie; None when it cannot be read as Python."""
    raw = path.read_bytes()
    if _CHARMAP_MARK in raw[:400]:
        return None
    try:
        return raw.decode(tokenize.detect_encoding(io.BytesIO(raw).readline)[0])
    except (SyntaxError, UnicodeDecodeError, LookupError):
        return None


def _docstring_owners(tree: ast.Module) -> list[ast.AST]:
    """Module, class and function nodes in source order (the ones that can hold a docstring).

    Only statement lists are walked (``body``, ``orelse``, ``finalbody``, ``handlers``,
    ``cases``): a ``def`` or ``class`` can appear nowhere else, and skipping expressions
    makes this several times faster than ``ast.walk``.
    """
    owners, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            owners.append(node)
        children = [c for field in ("body", "handlers", "orelse", "finalbody", "cases")
                    for c in getattr(node, field, None) or () if isinstance(c, ast.AST)]
        stack.extend(reversed(children))  # popped in source order
    return owners


def _docstring_expr(node: ast.AST) -> ast.Expr | None:
    body = getattr(node, "body", None)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[0]
    return None


_DOCTEST_BLOCK = re.compile(r"^[ \t]*>>>.*?(?:\n[ \t]*\n|\Z)", re.S | re.M)


def clean_docstring(doc: str) -> str | None:
    """A dedented docstring without doctest examples, or None if it is not English prose."""
    text = _DOCTEST_BLOCK.sub("\n", inspect.cleandoc(doc))
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    if len(text) < MIN_DOCSTRING_CHARS:
        return None
    prose = sum(c.isalpha() or c == " " for c in text)
    return text if prose >= MIN_PROSE_FRACTION * len(text) else None


def strip_docstrings(source: str) -> str:
    """``source`` with its module, class and function docstrings removed.

    Docstrings are located with :mod:`ast` and cut from the text itself, so comments and
    formatting survive; a body left empty gets ``pass``. When a second string statement
    follows a docstring it becomes the docstring once the first is gone: it goes too.
    Raises ``SyntaxError`` when ``source`` does not parse.
    """
    tree = ast.parse(source)
    for _ in range(8):
        edits = [(e, n) for n in _docstring_owners(tree) if (e := _docstring_expr(n)) is not None]
        if not edits:
            return source
        lines = source.encode("utf-8").splitlines(keepends=True)  # ast offsets are UTF-8 bytes
        for expr, node in sorted(edits, key=lambda e: -e[0].lineno):
            a, b = expr.lineno - 1, expr.end_lineno - 1
            head, tail = lines[a][: expr.col_offset], lines[b][expr.end_col_offset:]
            whole_lines = not head.strip() and (not tail.strip() or tail.lstrip().startswith(b"#"))
            if whole_lines and (isinstance(node, ast.Module) or len(node.body) > 1):
                lines[a: b + 1] = []
            else:  # the body's only statement, or shares a line: `def f(): "doc"`
                lines[a: b + 1] = [head + b"pass" + tail]
        source = b"".join(lines).decode("utf-8")
        if not any(len(n.body) > 1 and _docstring_expr(ast.Module(body=n.body[1:])) for _, n in edits):
            return source  # no string statement came next, so no new docstring appeared
        tree = ast.parse(source)
    raise ValueError("docstring removal did not converge")  # pragma: no cover


# ---- the three domains -----------------------------------------------------------------
def english_documents() -> list[Document]:
    """pydoc topics (sorted by key) and prose docstrings of the stdlib (file order), deduplicated."""
    from pydoc_data.topics import topics

    docs, seen = [], set()
    for key in sorted(topics):
        text = topics[key].strip()
        if text not in seen:  # a few topics share one page
            seen.add(text)
            docs.append(Document(f"pydoc:{key}", text))
    for rel, path in stdlib_files():
        source = _read_source(path)
        if source is None:
            continue
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in _docstring_owners(tree):
            expr = _docstring_expr(node)
            text = clean_docstring(expr.value.value) if expr is not None else None
            if text is not None and text not in seen:
                seen.add(text)
                docs.append(Document(rel, text))
    return docs


def python_documents() -> list[Document]:
    """One document per stdlib source file, docstrings removed; files that fail to parse are skipped."""
    docs = []
    for rel, path in stdlib_files():
        source = _read_source(path)
        if source is None:
            continue
        try:
            code = strip_docstrings(source)
        except (SyntaxError, ValueError):
            continue
        if code.strip():
            docs.append(Document(rel, code.lstrip("\n")))  # blank lines a module docstring left
    return docs


def c_documents() -> list[Document]:
    """One document per C header of this Python's include directory, sorted."""
    root = Path(sysconfig.get_paths()["include"])
    headers = sorted(root.rglob("*.h")) if root.is_dir() else []
    if not headers:
        raise FileNotFoundError(
            f"the 'c' corpus reads this Python's C headers, but {root} has none; install the "
            "Python development headers (e.g. the python3-dev package) or use 'english'/'python'"
        )
    return [Document("include:" + p.relative_to(root).as_posix(),
                     p.read_text(encoding="utf-8", errors="replace")) for p in headers]


_BUILDERS = {"english": english_documents, "python": python_documents, "c": c_documents}


def split_documents(docs: Sequence[Document], val_fraction: float = VAL_FRACTION):
    """``(train, val)`` lists: whole groups by hash, each ordered by (group hash, original order)."""
    keyed = sorted(enumerate(docs), key=lambda e: (group_hash(e[1].group), e[0]))
    train = [d for _, d in keyed if group_hash(d.group) >= val_fraction]
    val = [d for _, d in keyed if group_hash(d.group) < val_fraction]
    return train, val


# ---- cache and loading -----------------------------------------------------------------
def _domain_path(domain: str, split: str) -> Path:
    return cache_dir() / "corpus" / python_tag() / f"{domain}.{split}.txt"


def build_domain(domain: str) -> dict:
    """Build one domain from scratch, write both splits to the cache, return its manifest entry."""
    docs = _BUILDERS[domain]()
    entry = {}
    for split, part in zip(SPLITS, split_documents(docs)):
        text = DOC_SEPARATOR.join(d.text for d in part)
        write_text_atomic(_domain_path(domain, split), text)
        entry[split] = {"documents": len(part), "groups": len({d.group for d in part}),
                        "bytes": len(text.encode("utf-8")),
                        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    manifest = cache_dir() / "corpus" / python_tag() / f"{domain}.json"
    write_text_atomic(manifest, json.dumps({"domain": domain, "python": python_tag(), **entry}, indent=1))
    return entry


def parse_name(name: str) -> tuple[str, ...]:
    """``'mixed'`` -> ``('english', 'python')``; checks every part is a known domain."""
    if not isinstance(name, str):
        raise TypeError(f"corpus name must be a str, got {type(name).__name__}")
    parts = tuple(p.strip() for p in ALIASES.get(name, name).split("+"))
    bad = [p for p in parts if p not in DOMAINS]
    if bad or len(set(parts)) != len(parts):
        raise ValueError(
            f"unknown corpus {name!r}: expected one of {DOMAINS}, an alias {list(ALIASES)}, "
            "or domains joined by '+' (e.g. 'english+c'); for your own text use load_text_file(path)"
        )
    return parts


def is_corpus_name(spec: str) -> bool:
    """True when ``spec`` names a built-in corpus (a name wins over a file of that name)."""
    try:
        return bool(parse_name(spec))
    except (TypeError, ValueError):
        return False


def _check_split_and_size(split: str, max_bytes) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer))
                                  or max_bytes <= 0):
        raise ValueError(f"max_bytes must be a positive int or None (everything), got {max_bytes!r}")


def truncate_utf8(text: str, max_bytes: int | None) -> str:
    """The longest prefix of ``text`` whose UTF-8 encoding fits in ``max_bytes``."""
    if max_bytes is None:
        return text
    raw = text.encode("utf-8")
    return text if len(raw) <= max_bytes else raw[:max_bytes].decode("utf-8", errors="ignore")


def load_domain(domain: str, split: str = "train", max_bytes: int | None = None) -> str:
    """One domain's split, built and cached on first use, cut to ``max_bytes``."""
    _check_split_and_size(split, max_bytes)
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}: expected one of {DOMAINS}")
    path = _domain_path(domain, split)
    if not path.is_file():
        build_domain(domain)
    return truncate_utf8(path.read_text(encoding="utf-8"), max_bytes)


def load_mixture(domains: Iterable[str], split: str = "train", max_bytes: int | None = None,
                 weights: Sequence[float] | None = None) -> str:
    """Domains concatenated with byte shares ``weights`` (default: their natural sizes).

    With ``weights`` and no ``max_bytes``, the largest total that keeps the shares exact is
    used. The parts are concatenated; random-window batches mix them by those shares.
    """
    domains = list(domains)
    if not domains:
        raise ValueError("load_mixture needs at least one domain, e.g. ['english', 'c']")
    _check_split_and_size(split, max_bytes)
    texts = [load_domain(d, split) for d in domains]
    sizes = np.array([len(t.encode("utf-8")) for t in texts], dtype=np.float64)
    if weights is None:
        shares = sizes / sizes.sum()
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(domains),) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights must be {len(domains)} non-negative numbers with a positive sum, "
                             f"got {weights!r}")
        shares = w / w.sum()
    total = sizes.sum() if weights is None else min(sizes[i] / s for i, s in enumerate(shares) if s > 0)
    if max_bytes is not None:
        total = min(total, max_bytes)
    parts = [truncate_utf8(t, int(total * s)) for t, s in zip(texts, shares)]
    return DOC_SEPARATOR.join(p for p in parts if p)


def load_corpus(name: str = "english", split: str = "train", max_bytes: int | None = None) -> str:
    """Text of a built-in corpus: ``english``, ``python``, ``c``, ``mixed`` or ``a+b``.

    ``max_bytes`` keeps the first bytes of the split (a representative sample, since
    documents are in hash order); None keeps everything.
    """
    domains = parse_name(name)
    if len(domains) == 1:
        return load_domain(domains[0], split, max_bytes)
    return load_mixture(domains, split, max_bytes)


def load_text_and_other_code(split: str = "train", max_bytes: int | None = None,
                             code_fraction: float | None = None) -> str:
    """English plus non-Python code (C headers): the "text + other code" pretraining mix.

    ``code_fraction`` sets the C share of bytes (default: the natural proportion).
    """
    if code_fraction is not None and not 0.0 <= code_fraction <= 1.0:
        raise ValueError(f"code_fraction must lie in [0, 1], got {code_fraction!r}")
    weights = None if code_fraction is None else [1.0 - code_fraction, code_fraction]
    return load_mixture(("english", "c"), split, max_bytes, weights)


def corpus_stats(name: str = "english") -> dict:
    """Bytes, documents and groups per split, from the cache manifest (built if needed)."""
    out = {}
    for domain in parse_name(name):
        manifest = cache_dir() / "corpus" / python_tag() / f"{domain}.json"
        if not manifest.is_file() or not _domain_path(domain, "val").is_file():
            build_domain(domain)
        out[domain] = json.loads(manifest.read_text(encoding="utf-8"))
    return out


# ---- any text file -----------------------------------------------------------------------
def load_text_file(path, val_fraction: float = VAL_FRACTION) -> tuple[str, str]:
    """``(train, val)`` text of a UTF-8 file: the last ``val_fraction`` becomes validation.

    The cut moves forward to the next line start when one is close, so validation
    begins with a whole line.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction!r}")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"corpus file {str(p)!r} does not exist; pass the path of a UTF-8 "
                                f"text file, or a built-in corpus name {DOMAINS + tuple(ALIASES)}")
    if p.is_dir():
        raise ValueError(f"corpus path {str(p)!r} is a directory; pass one UTF-8 text file "
                         "(concatenate several with `cat a.txt b.txt > all.txt`)")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"corpus file {str(p)!r} is not UTF-8 (bad byte {raw[e.start]:#04x} at "
                         f"offset {e.start}); convert it, e.g. `iconv -f latin1 -t utf-8`") from None
    if len(text) < 2:
        raise ValueError(f"corpus file {str(p)!r} is {'empty' if not text else 'too short'}: "
                         "it needs text for both a training and a validation part")
    cut = min(max(int(len(text) * (1.0 - val_fraction)), 1), len(text) - 1)
    nl = text.find("\n", cut, cut + 1000)
    if 0 <= nl < len(text) - 1:
        cut = nl + 1
    return text[:cut], text[cut:]


# ---- token arrays ----------------------------------------------------------------------
@dataclass
class Corpus:
    """Train and validation token ids of a corpus, with the tokenizer that made them."""

    name: str  # corpus name or file path
    train: np.ndarray  # (N_train,) int64 token ids
    val: np.ndarray  # (N_val,) int64 token ids
    tokenizer: ByteTokenizer  # the tokenizer that produced the ids

    @classmethod
    def load(cls, spec: str = "english", max_bytes: int | None = None,
             val_max_bytes: int | None = None, val_fraction: float = VAL_FRACTION,
             tokenizer: ByteTokenizer | None = None) -> "Corpus":
        """A built-in corpus by name, or any UTF-8 file by path (``val_fraction`` then applies)."""
        tok, spec = tokenizer or ByteTokenizer(), str(spec)
        if is_corpus_name(spec):
            train = load_corpus(spec, "train", max_bytes)
            val = load_corpus(spec, "val", val_max_bytes)
        else:
            _check_split_and_size("train", max_bytes)
            _check_split_and_size("val", val_max_bytes)
            train, val = load_text_file(spec, val_fraction)
            train, val = truncate_utf8(train, max_bytes), truncate_utf8(val, val_max_bytes)
        return cls(spec, tok.encode(train), tok.encode(val), tok)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def unigram_baseline(self) -> float:
        """Validation cross-entropy (nats/token) of add-one unigram counts from train."""
        from .batches import unigram_cross_entropy

        return unigram_cross_entropy(self.train, self.val, self.vocab_size)
