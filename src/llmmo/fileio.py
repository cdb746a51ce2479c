"""Writing files and folders so that a crash leaves the old version or the new one, never half of one."""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """A temporary path beside `dest` that becomes `dest` when the block succeeds and is removed otherwise."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        sync(tmp)
        tmp.replace(dest)
        sync(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)


def sync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk: a rename survives a power cut only once the data
    it names is on the disk, and the rename itself only once its folder is. Folders are flushed where the system
    allows it (not on Windows, nor on some network and virtual file systems, which refuse it). macOS flushes to
    the drive, not through its cache (that takes F_FULLFSYNC)."""
    if path.is_dir():
        if os.name == "nt":
            return
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError as e:  # EINVAL, ENOTSUP, ...: this file system keeps folders its own way
            if e.errno not in _UNSYNCABLE:
                raise
        finally:
            os.close(fd)
        return
    with path.open("rb+") as f:  # Windows flushes only a handle open for writing
        os.fsync(f.fileno())


_UNSYNCABLE = {errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EPERM}


def is_glob(path: str) -> bool:
    """Whether `data.path` is a pattern (glob) rather than a file or folder name."""
    return any(c in path for c in "*?[")


def absolute_path(path: str) -> str:
    """`path` with `~` expanded and made absolute; a relative glob keeps the working folder's own `*?[` literal."""
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return path
    # joined, not normalised: `link/..` is where the link's target's parent is, which only the system knows
    return os.path.join(glob.escape(os.getcwd()) if is_glob(path) else os.getcwd(), path)


def complete_json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each line of a JSON-lines file that is written by appending (metrics, a sweep's
    ledger); a line that does not parse was cut short by a crash while it was being appended, and is left out."""
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError:
            continue


def write_text_atomic(dest: Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def previous_folder(dest: Path) -> Path:
    """Where `atomic_folder` parks the old folder during its swap (found there only after a crash)."""
    return dest.with_name(f".{dest.name}.previous")


@contextmanager
def atomic_folder(dest: Path) -> Iterator[Path]:
    """A temporary folder to fill; on success it replaces `dest`. POSIX cannot swap a non-empty folder in one
    step, so the old one is first parked at `previous_folder(dest)`; a crash between the two renames leaves it
    there, and the next swap (or the reader's error message) takes it from there."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    previous = previous_folder(dest)
    if previous.exists() and not dest.exists():  # an earlier swap was cut between its two renames
        previous.rename(dest)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        for path in [*tmp.rglob("*"), tmp]:
            sync(path)
        shutil.rmtree(previous, ignore_errors=True)
        if dest.exists():
            dest.rename(previous)
        tmp.rename(dest)
        sync(dest.parent)  # the renames are on the disk before the old folder goes
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
