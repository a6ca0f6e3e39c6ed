"""Reading files that may be damaged: one error style, and digests that catch a flipped byte.

Every loader of minipeft (checkpoints, adapters, Hugging Face directories, the cache of
base models) reads through these functions, so a truncated, cut or overwritten file
raises :class:`DamagedFileError` (a ``ValueError``) whose message names

* the **path** of the file,
* **what is wrong** with it (cut JSON, not UTF-8, a safetensors header that does not parse,
  contents that no longer match their digest),
* the **remedy** the caller knows ("delete DIR and rerun", "resave the adapter"),

instead of a bare ``JSONDecodeError``, ``UnicodeDecodeError`` or ``SafetensorError``.

Structure alone does not reveal a flipped byte inside the tensor data, so files minipeft
writes carry a SHA-256 **digest of their contents**: safetensors files in their header's
metadata (``minipeft_sha256``, over every tensor's name, dtype, shape and bytes; peft and
transformers ignore metadata they do not know), minipeft's own JSON files in a
``minipeft_sha256`` field over the rest of the object. A file without a digest (written by
another library) is checked for structure only.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

DIGEST_KEY = "minipeft_sha256"  # safetensors metadata key / JSON field holding the content digest


class DamagedFileError(ValueError):
    """A file is missing parts, does not parse, or no longer matches its digest.

    ``path``: the file; ``problem``: what is wrong; ``remedy``: what to do.
    """

    def __init__(self, path, problem: str, remedy: str) -> None:
        self.path, self.problem, self.remedy = os.fspath(path), problem, remedy
        super().__init__(f"{self.path} is damaged: {problem}. {remedy}")


# ------------------------------------------------------------------ digests


def tensor_digest(tensors: dict) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        a = np.ascontiguousarray(tensors[k])
        h.update(f"{k}\0{a.dtype.name}\0{a.shape}\0".encode())
        h.update(a.reshape(-1).view(np.uint8) if a.size else b"")
    return h.hexdigest()


def json_digest(obj) -> str:
    """SHA-256 of the canonical JSON of ``obj`` (sorted keys), so that formatting does not matter."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------ JSON


def dumps_with_digest(obj: dict, indent: int | None = 1) -> str:
    """``obj`` as JSON text with a ``minipeft_sha256`` field over the rest (see ``read_json``)."""
    body = {k: v for k, v in obj.items() if k != DIGEST_KEY}
    return json.dumps({**body, DIGEST_KEY: json_digest(body)}, indent=indent)


def read_json(path, remedy: str, expect=dict) -> dict:
    """Parse the JSON file ``path``; any damage raises ``DamagedFileError(path, ..., remedy)``.

    A ``minipeft_sha256`` field, if present, is checked against the rest and removed.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing. {remedy}") from None
    if not raw.strip():
        raise DamagedFileError(path, f"the file is empty ({len(raw)} bytes)", remedy)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DamagedFileError(path, f"not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})",
                               remedy) from None
    except json.JSONDecodeError as e:
        raise DamagedFileError(path, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno}; "
                               f"{len(raw)} bytes)", remedy) from None
    except RecursionError:
        raise DamagedFileError(path, "JSON nested too deeply", remedy) from None
    if expect is not None and not isinstance(obj, expect):
        raise DamagedFileError(path, f"expected a JSON {'object' if expect is dict else expect.__name__}, "
                               f"got {type(obj).__name__}", remedy)
    if isinstance(obj, dict) and DIGEST_KEY in obj:
        stored = obj.pop(DIGEST_KEY)
        if stored != json_digest(obj):
            raise DamagedFileError(path, "its contents no longer match the digest written with them "
                                   "(a changed byte)", remedy)
    return obj


# ------------------------------------------------------------------ safetensors


def save_tensors(tensors: dict, path, metadata: dict | None = None, **extra_digests: str) -> str:
    """``safetensors.numpy.save_file`` with the tensors' digest in the metadata; returns the digest.

    ``extra_digests``: more ``name=digest`` metadata entries (e.g. the digest of the config
    file written beside, so that loading can tell if the pair still belongs together).
    """
    from safetensors.numpy import save_file

    digest = tensor_digest(tensors)
    meta = {**(metadata or {}), DIGEST_KEY: digest, **extra_digests}
    save_file(tensors, os.fspath(path), metadata=meta)
    return digest


def read_metadata(path, remedy: str) -> dict:
    """The header metadata of a safetensors file (``{}`` if none); header damage raises."""
    from safetensors import safe_open

    _check_exists(path, remedy)
    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # SafetensorError and friends: the header does not parse
        raise DamagedFileError(path, f"not a readable safetensors file ({type(e).__name__}: {e})", remedy) from None


def load_tensors(path, remedy: str) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, metadata) of a safetensors file, its digest checked when it has one."""
    from safetensors import safe_open

    _check_exists(path, remedy)
    size = os.path.getsize(path)
    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise DamagedFileError(path, f"not a readable safetensors file ({type(e).__name__}: {e}; "
                               f"{size} bytes)", remedy) from None
    stored = meta.get(DIGEST_KEY)
    if stored is not None and stored != tensor_digest(tensors):
        raise DamagedFileError(path, "its tensors no longer match the digest written with them (a changed "
                               "byte)", remedy)
    return tensors, meta


def _check_exists(path, remedy: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(path)} is missing. {remedy}")


__all__ = ["DamagedFileError", "DIGEST_KEY", "tensor_digest", "json_digest", "dumps_with_digest", "read_json",
           "save_tensors", "read_metadata", "load_tensors"]
