"""Where llmmo keeps what it downloads and computes, and how it writes there safely.

- `$LLMMO_CACHE` (default `~/.cache/llmmo`): downloaded sources, tokenizers trained on a corpus, token memmaps.
- `$LLMMO_DATA_DIR`: a read-only mirror of the named sources, laid out `<source>/<original file name>`, for
  machines without internet.
- `LLMMO_OFFLINE=1`: never download; a source found in neither place is an error that says where to put it.

Every file is written under a temporary name beside its destination and renamed into place, so that a crash,
a Ctrl-C or a second process writing the same entry never leaves half a file where a reader looks.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

# Bump when the text a split stands for, or how its tokens are joined, changes: old cache entries are then
# never read again (they are keyed by this too).
FORMAT_VERSION = 3  # 2: .json arrays of records are read as records; 3: imported (hf) tokenizers encode documents whole


def cache_dir() -> Path:
    return Path(os.environ.get("LLMMO_CACHE") or "~/.cache/llmmo").expanduser()


def mirror_dir() -> Path | None:
    value = os.environ.get("LLMMO_DATA_DIR", "")
    return Path(value).expanduser() if value else None


def offline() -> bool:
    return os.environ.get("LLMMO_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def fingerprint(identity: Any) -> str:
    """A short stable hash of a JSON-able description of some input (files, options, versions)."""
    text = json.dumps({"format": FORMAT_VERSION, "identity": identity}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def file_identity(path: Path) -> list[Any]:
    """What says a file is unchanged without reading it: its absolute path, size, inode, and modification and
    change times. The change time too, because copying tools keep the modification time (`cp -p`, `rsync -t`,
    `tar x`) of a file that may have the same size; no tool can set the change time (on Linux and macOS; Windows
    reports the creation time there)."""
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns]
