"""Files qmace writes: atomically (a temporary file beside the target, renamed over it; never half-written),
with the permissions the user's umask gives a new file (0644 under umask 022), inside the folder they belong
to, and with every operating-system fault turned into one ``FileAccessError`` naming the path."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from qmace.errors import FileAccessError, PathError


def os_reason(e: OSError) -> str:
    """The operating system's reason for ``e`` in words ("No space left on device").

    Args:
        e: the OS error.

    Returns:
        ``e.strerror``, or the exception type's name when the error carries no strerror.
    """
    return e.strerror or type(e).__name__


def file_error(e: OSError, path: str | os.PathLike, doing: str) -> FileAccessError:
    """The named error for a filesystem fault: ``<path>: cannot <doing>: <reason>``.

    Args:
        e: the OS error caught.
        path: the file the caller was working on.
        doing: the action, e.g. ``"write"``, ``"read"``.

    Returns:
        A FileAccessError (to raise), also naming ``e.filename`` when that is another path than ``path``.
    """
    other = f" ({e.filename})" if e.filename and str(e.filename) != str(path) else ""
    return FileAccessError(f"{path}: cannot {doing}: {os_reason(e)}{other}")


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ensure_dir(path: str | os.PathLike) -> Path:
    """``mkdir -p``.

    Args:
        path: the folder to create (parents included); an existing folder is fine.

    Returns:
        ``path`` as a Path.

    Raises:
        FileAccessError: naming the folder on any fault (a file in the way, read-only, ...).
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise FileAccessError(f"{path}: cannot create folder: a file of that name (or of a parent's) exists") from None
    except OSError as e:
        raise file_error(e, path, "create folder") from None
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success rename it over ``path``.

    On any error or interrupt (KeyboardInterrupt, SIGTERM via the CLI's handler) the temporary file is removed
    and ``path`` keeps its previous content. The file gets mode ``0o666 & ~umask``.

    Args:
        path: the file to write; its folder is created.
        mode: ``open`` mode, ``"w"`` or ``"wb"``.
        encoding: text encoding (ignored in binary mode).

    Returns:
        A context manager yielding the open temporary file.

    Raises:
        FileAccessError: naming ``path`` for every filesystem fault (read-only, parent is a file, target is a
            folder, disk full, ...); errors raised by the caller's block propagate unchanged.
    """
    path = Path(path)
    if path.is_dir():
        raise FileAccessError(f"{path}: cannot write: is a folder")
    ensure_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise file_error(e, path, "write") from None
    binary = "b" in mode
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise file_error(e, path, "write") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_plain_name(name: str, where: str) -> str:
    """A name that becomes one path component (library_name, a model name).

    No separator, not ``.``/``..``, not empty, no NUL or control character.

    Args:
        name: the name to check.
        where: what names it, for the message (e.g. ``"m.yml: library_name"``).

    Returns:
        ``name`` unchanged.

    Raises:
        PathError: naming ``where`` when the name is not plain.
    """
    bad = None
    if not name:
        bad = "is empty"
    elif name in (".", ".."):
        bad = f"{name!r} is not a plain name"
    elif "/" in name or "\\" in name or os.sep in name or (os.altsep and os.altsep in name):
        bad = f"{name!r} contains a path separator"
    elif any(ord(c) < 32 or c == "\x7f" for c in name):
        bad = f"{name!r} contains a control character"
    elif name.startswith("~"):
        bad = f"{name!r} starts with '~'"
    if bad:
        raise PathError(f"{where}: {bad}; it names a folder or file inside the build folder, so it must be a "
                        "plain name (letters, digits, '_', '-', '.')")
    return name


def check_inside(root: str | os.PathLike, path: str | os.PathLike, what: str) -> Path:
    """``path`` resolved, checked to lie inside ``root`` (symlinks followed).

    Args:
        root: the folder that must contain the path (e.g. ``--build_dir``).
        path: the path to check.
        what: what the path is, for the message.

    Returns:
        The resolved path.

    Raises:
        PathError: the path escapes ``root``.
    """
    root_r = Path(root).resolve()
    path_r = Path(path).resolve()
    if path_r != root_r and not path_r.is_relative_to(root_r):
        raise PathError(f"{path}: {what} would be written outside {root}")
    return path_r
