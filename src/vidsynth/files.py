"""Files written whole or not at all: each under a hidden name beside where it goes, renamed into place when it is
complete, removed when writing it fails. A write the system refuses (a full disk, an I/O error) raises WriteError
naming the file, rather than an OSError from inside an encoder, and leaves nothing of that file behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Iterator, Optional, Union

from safetensors import SafetensorError

from .errors import OutputError, WriteError

PathLike = Union[str, os.PathLike]
# What the disk, rather than a network or an input, refuses a write with: no space or quota left, a file size limit,
# a read-only file system (by name: not every system defines every one).
STORAGE_ERRNOS = {getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS") if hasattr(errno, name)}


def check_file_path(path: PathLike) -> Path:
    """Fail before any work is done if a file cannot be written at `path` (any kind of file)."""
    path = Path(path).expanduser()
    check_writable_folder(path.parent)
    if path.is_dir():
        raise OutputError(f"{path} is a directory")
    return path


def check_writable_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise OutputError(f"output directory {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"output directory {folder} is not writable")
    try:  # the permission bits are not the whole answer: a pseudo or network file system, no inodes left
        new_path_beside(folder / "write-check", ".check").unlink()
    except OSError as exc:
        raise OutputError(f"cannot create files in output directory {folder}: {exc.strerror or exc}") from None


def refused_write_reason(error: BaseException) -> Optional[str]:
    """The system's reason when `error` is a write it refused (a full disk, an I/O error), else None. safetensors
    raises its own error type for them, with the system's reason inside its message."""
    if isinstance(error, WriteError):
        return error.reason
    if isinstance(error, OSError):
        return error.strerror or str(error)
    if isinstance(error, SafetensorError):
        found = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", str(error))
        return found.group(1) if found else None
    return None


def storage_refusal(error: BaseException) -> Optional[str]:
    """The system's reason when `error`, or an error it was raised from, is the disk refusing a write; else None.
    For work that also reads a network (a download), where other OSErrors are not the disk's."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            return error.strerror or os.strerror(error.errno)
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def write_errors_reported(path: PathLike) -> Iterator[None]:
    """A write the system refuses while writing `path` raises WriteError, naming it."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        reason = refused_write_reason(exc)
        if reason is None:
            raise
        raise WriteError(f"could not write {path}: {reason}", reason) from exc


def new_path_beside(path: Path, suffix: str = ".part", *, folder: bool = False) -> Path:
    """A new hidden file (or folder) beside `path`, to be written and renamed over it. Created as open() and mkdir()
    create them, with the permissions the umask gives: tempfile's mkstemp and mkdtemp make them private to the
    owner, which the finished video or model would keep."""
    while True:
        candidate = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            if folder:
                candidate.mkdir()
            else:
                os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return candidate
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[str]:
    """A temporary file beside `path` (keeping its extension, which some writers go by), renamed over `path` when the
    block ends and removed if it fails."""
    with write_errors_reported(path):
        temporary = new_path_beside(path, f".part{path.suffix}")
        try:
            yield str(temporary)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """A temporary folder beside `path` (which must be absent or an empty folder), renamed to `path` when the block
    ends and removed with what it holds if it fails."""
    with write_errors_reported(path):
        temporary = new_path_beside(path, folder=True)
        try:
            yield temporary
            if path.exists():
                path.rmdir()
            os.replace(temporary, path)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
