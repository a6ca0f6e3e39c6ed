"""Atomic saves: the previous version of a file or directory stays whole until the new one is complete.

A directory of several files (a checkpoint, an adapter, a cached base model) cannot be
replaced file by file without a moment where it holds a mix of the old and the new. So
``atomic_directory(target)`` writes the whole new version into a temporary directory
beside ``target``, flushes every file to disk (``fsync``), and then swaps it in::

    target  -> .target.old-<pid>-<tag>     (1) the previous version, renamed aside, still whole
    .target.tmp-<pid>-<tag> -> target      (2) the new version, complete, renamed in
    rm -r .target.old-<pid>-<tag>          (3)

Each rename is atomic (POSIX ``rename(2)``), so a process killed at any point leaves either
the previous version or the new one under ``target`` -- or, between (1) and (2), no
``target`` and the previous version whole at ``.target.old-*``. Readers call
``recover(target)`` first: it renames that previous version back. Leftovers of killed
saves (``.target.tmp-*``, ``.target.old-*``, ``.target.del-*``) are removed by the next
save of the same target.

Entries of the previous version that the new one does not write (another adapter's
sub-folder, an outputs file) are carried into the new version by hard links, so saving one
adapter never deletes its neighbours; ``owned`` names the entries a save replaces or drops.

Single files (JSON results, figures) use ``write_text_atomic``/``write_bytes_atomic``: a
temporary file in the same directory, ``fsync``, ``os.replace``.

Not handled: two processes saving or recovering the same target at the same moment.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|del)-(?P<pid>\d+)-[0-9a-z_]+$")


def _aside(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _leftovers(target: Path, kinds=("tmp", "old", "del"), nested: bool = False) -> list[Path]:
    """Leftovers of saves of ``target`` in its parent, oldest first.

    ``nested``: also those of saves into a leftover (``..target.tmp-1-a.tmp-1-b``: a save
    inside an atomic save, e.g. ``save_hf`` into the temporary directory of a cached base).
    """
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    out = []
    for n in names:
        m = _LEFTOVER.match(n)
        if not m or m["kind"] not in kinds:
            continue
        inner = m
        while nested and inner["name"] != target.name and _LEFTOVER.match(inner["name"]):
            inner = _LEFTOVER.match(inner["name"])
        if inner["name"] == target.name:
            out.append(target.parent / n)
    return sorted(out, key=lambda p: p.lstat().st_mtime_ns if p.exists() else 0)


def _fsync_path(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:  # a directory cannot be opened on Windows: nothing to flush there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            p = Path(dirpath) / f
            if not p.is_symlink():
                _fsync_path(p)
        _fsync_path(Path(dirpath), directory=True)


def _resolve(target) -> Path:
    target = Path(os.path.abspath(os.fspath(target)))
    if target.is_symlink():  # replace what the link points to, keep the link
        target = Path(os.path.realpath(target))
    return target


def recover(target) -> bool:
    """Put back the previous version of ``target`` if a save was killed between its two renames.

    Returns True when something was put back. A ``target`` that exists is left alone.
    """
    target = _resolve(target)
    if os.path.lexists(target):
        return False
    olds = _leftovers(target, ("old",))
    if not olds:
        return False
    try:
        os.replace(olds[-1], target)  # the newest previous version
    except OSError:
        return False
    _fsync_path(target.parent, directory=True)
    return True


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of ``src`` whose files are hard links (copies where links fail)."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir()
        for child in src.iterdir():
            _link_tree(child, dst / child.name)
    else:
        try:
            os.link(src, dst)
        except OSError:  # a file system without hard links
            shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path, owned) -> None:
    """Link into ``new`` every entry of ``old`` that the new version neither wrote nor owns."""
    if not old.is_dir():
        return
    owned = set(owned)
    entries = {p.name: p for p in old.iterdir()}
    for name, p in entries.items():
        m = _LEFTOVER.match(name)
        if m:  # a killed nested save: keep only a previous version that has no other copy
            name = m["name"]
            if m["kind"] != "old" or name in entries:
                continue
        if name in owned or os.path.lexists(new / name):
            continue
        _link_tree(p, new / name)


def _same_or_inside(a: Path, b: Path) -> bool:
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


@contextlib.contextmanager
def atomic_directory(target, owned=None, fsync: bool = True) -> Iterator[Path]:
    """``with atomic_directory(target, owned) as tmp:`` write the new version into ``tmp``.

    On a normal exit ``tmp`` replaces ``target`` (see the module docstring); on an
    exception ``tmp`` is removed and ``target`` is untouched. ``owned``: names of the entries
    this save writes or removes; every other entry of the previous version is carried over.
    ``owned=None``: the new version replaces the directory entirely.
    """
    target = _resolve(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} is a file; a directory was expected here. Remove it or save elsewhere")
    if _same_or_inside(Path.cwd().resolve(), target.resolve()):
        raise ValueError(f"cannot replace {target}: it holds the current working directory; save into a "
                         f"sub-folder instead (e.g. {target / 'out'})")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = _aside(target, "tmp")
    tmp.mkdir(mode=0o777)  # the umask applies, as for a directory made by hand
    try:
        yield tmp
        if owned is not None:
            _carry_over(target, tmp, owned)
        if fsync:
            _fsync_tree(tmp)
        _swap(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for p in _leftovers(target, nested=True):  # debris of earlier killed saves of this target
        m = _LEFTOVER.match(p.name)
        if m["kind"] != "tmp" or not _pid_alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)


def _swap(tmp: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = _aside(target, "old")
        os.replace(target, old)  # (1) the previous version, whole, aside
    try:
        os.replace(tmp, target)  # (2) the new version in
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    _fsync_path(target.parent, directory=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # (3)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers: nothing of ours is in flight once a save has finished
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: keep the leftover
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_directory(path) -> None:
    """Delete a directory so that a kill midway never leaves a half-deleted one under its name.

    It is renamed aside (``.name.del-*``) first, then removed; a later save cleans up what
    a kill left.
    """
    path = Path(path)
    if not path.exists():
        return
    aside = _aside(path, "del")
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def write_bytes_atomic(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_path(path.parent, directory=True)
    return path


def write_text_atomic(path, text: str) -> Path:
    """``write_bytes_atomic`` of ``text`` in UTF-8."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable_dir(path) -> str | None:
    """Why files cannot be written into directory ``path`` (created if missing), or None if they can.

    Nothing is created: ``path`` must be a writable directory, or its nearest existing
    ancestor one in which it can be made.
    """
    p = Path(os.path.abspath(os.fspath(path)))
    if p.exists() and not p.is_dir():
        return f"{p} is a file, not a folder"
    q = p
    while not q.exists() and q.parent != q:
        q = q.parent
    if not q.is_dir():
        return f"{q} is a file, so the folder {p} cannot be made"
    if not os.access(q, os.W_OK | os.X_OK):
        return f"{q} is not writable"
    return None


__all__ = ["atomic_directory", "recover", "remove_directory", "write_bytes_atomic", "write_text_atomic",
           "check_writable_dir"]
