"""Writes that never leave a half-written file and keep the previous version until the new one is complete.

Every output a user cares about (saved models, ONNX exports, mined files, evaluation results, caches,
run summaries) goes through here:

* **Files** (``write_bytes``, ``write_text``, ``write_json``, ``atomic_file``): written to a temporary
  file beside the target, flushed and fsynced, then ``os.replace``-d over it (atomic on POSIX) and the
  folder fsynced. A crash at any point leaves either the old file or the new one, never a mix.
* **Folders** (``staged_folder``, ``install_folder``): the new folder is written beside the target
  under a hidden name, every file fsynced, then swapped in. On Linux the swap is one atomic
  ``renameat2(RENAME_EXCHANGE)``; elsewhere the old folder is renamed aside, the new one renamed in, and
  only then is the old one deleted. If the second rename fails the old folder is renamed back; if the
  process dies between the two renames, the next ``install_folder``/``recover_folder`` on that target
  renames the old folder back first. The previous version is deleted only once the new one is in place.

All disk steps go through ``_rename`` and ``_exchange`` so that tests can inject a crash between steps.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_file",
    "fsync_dir",
    "install_folder",
    "recover_folder",
    "staged_folder",
    "write_bytes",
    "write_json",
    "write_text",
]

_OLD = ".old-"
_NEW = ".new-"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a folder's entries (renames, new files) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _load_renameat2() -> Callable[[Path, Path], None] | None:
    """``renameat2(..., RENAME_EXCHANGE)`` from the C library (Linux, glibc >= 2.28), or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2

    def exchange(a: Path, b: Path) -> None:
        if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(a))

    return exchange


#: Swap two paths atomically, or None where the OS cannot (then folders are renamed aside and in).
_exchange: Callable[[Path, Path], None] | None = _load_renameat2()


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike[str], mode: str = "w", *, encoding: str = "utf-8"
) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path`` (fsynced).

    Args:
        path: the file to write; its folder is created.
        mode: ``"w"`` (text) or ``"wb"`` (bytes).
        encoding: the text encoding (text mode).

    Yields:
        The open temporary file. On an exception it is deleted and ``path`` is left as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file: mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        # mkstemp makes the file private (0600): give it the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": encoding})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see ``atomic_file``); returns the path."""
    with atomic_file(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_file(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2, **kwargs: Any) -> Path:
    """Write ``obj`` as JSON (plus a final newline) to ``path`` atomically; returns the path."""
    return write_text(path, json.dumps(obj, indent=indent, **kwargs) + "\n")


# ----------------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------------
def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def _asides(target: Path) -> list[Path]:
    """Earlier versions of ``target`` renamed aside by an install that did not finish, newest first."""
    if not target.parent.is_dir():
        return []
    found = [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}{_OLD}")]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def recover_folder(target: str | os.PathLike[str]) -> bool:
    """Put back the previous version of ``target`` when an install died between its two renames.

    Returns:
        True when a previous version was renamed back into place.
    """
    t = Path(target)
    if t.exists():
        return False
    old = _asides(t)
    if not old:
        return False
    _rename(old[0], t)
    fsync_dir(t.parent)
    return True


def install_folder(staged: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Move the complete folder ``staged`` to ``target``, replacing what is there only once it is in.

    ``staged`` must be on the same file system as ``target`` (create it with ``staged_folder`` or in
    ``target.parent``). Its files are fsynced first.

    Raises:
        OSError: the move failed; ``target`` then still holds its previous version.
    """
    new, t = Path(staged), Path(target)
    _fsync_tree(new)
    recover_folder(t)
    if t.is_symlink() or (t.exists() and not t.is_dir()):
        raise FileExistsError(errno.EEXIST, "exists and is not a folder", str(t))
    if not t.exists() or not any(t.iterdir()):
        _rename(new, t)  # POSIX rename replaces an empty folder in one step
        fsync_dir(t.parent)
        return t
    if _exchange is not None:
        try:
            _exchange(new, t)  # one atomic step: `new` now holds the previous version
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
                raise
        else:
            fsync_dir(t.parent)
            shutil.rmtree(new, ignore_errors=True)
            return t
    old = t.with_name(f".{t.name}{_OLD}{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    _rename(t, old)
    try:
        _rename(new, t)
    except BaseException:
        _rename(old, t)  # the new version did not go in: put the previous one back
        raise
    fsync_dir(t.parent)
    shutil.rmtree(old, ignore_errors=True)
    return t


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh hidden folder beside ``target`` to write into; installed over ``target`` on a clean exit.

    Yields:
        The staging folder. On an exception it is deleted and ``target`` is left as it was.
    """
    t = Path(target)
    t.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{t.name}{_NEW}", dir=t.parent))
    try:
        os.chmod(staged, 0o777 & ~_umask())  # mkdtemp's 0700 would make the installed folder private
        yield staged
        install_folder(staged, t)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
