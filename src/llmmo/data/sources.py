"""Named corpora: where each lives on the web, what it must hash to, and how to find a local copy.

A named source's split is looked for, in order, in the cache (`$LLMMO_CACHE/sources/<source>/`), in the
mirror (`$LLMMO_DATA_DIR/<source>/`), and only then downloaded (with a progress bar on stderr) into the cache.
Only the files that the requested splits need are fetched. A download is checked against its published
checksum before it is renamed into the cache, so the cache only ever holds verified files; mirror files are
trusted as they are (like `--data.path`): they are copies someone placed there on purpose.

`pystdlib` is the odd one out: the local Python standard library's own source files, present on every machine
with Python, so demos and tests always have a corpus of a few megabytes without a network.
"""

from __future__ import annotations

import difflib
import hashlib
import http.client
import os
import shutil
import sys
import sysconfig
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from llmmo.errors import DataError
from llmmo.fileio import atomic_path

from .cache import cache_dir, mirror_dir, offline


@dataclass(frozen=True)
class RemoteFile:
    """One file of a named source: the names a local copy may have, and how to download it."""

    names: tuple[str, ...]  # accepted in the cache and the mirror; a download is saved as names[0]
    url: str  # the file itself, or a zip archive that holds it as `member`
    checksum: str  # of what `url` serves, "<hashlib algorithm>:<hex digest>"
    member: str = ""  # the file's path inside the zip at `url`; "" when `url` is the file


@dataclass(frozen=True)
class NamedSource:
    name: str
    splits: dict[str, RemoteFile]  # split name -> the file that holds its text
    val_fraction: float = 0.0  # > 0: all splits share one file, cut by characters: train first, val last


TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# pytorch/examples' word_language_model copies of WikiText-2 (v1, tokenized), which name the splits *.txt
PYTORCH_WIKITEXT2 = "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2"
# The official WikiText zips (Merity et al. 2016). Their first home, s3.amazonaws.com/research.metamind.io/wikitext/,
# now answers 403; the author's own site serves the same archives.
WIKITEXT_ZIPS = "https://wikitext.smerity.com"
# sha256 of the zips as published in huggingface/datasets, datasets/wikitext/dataset_infos.json
# ("download_checksums", commit 040102f100964a33fd334e2695f1c493fa6b92db).
WIKITEXT_ZIP_SHA256 = {
    "wikitext-2": "92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c",  # 4,475,746 bytes
    "wikitext-103": "242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590",  # 190,229,076 bytes
    "wikitext-2-raw": "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11",  # 4,721,645 bytes
    "wikitext-103-raw": "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794",  # 191,984,949 bytes
}
WIKITEXT_SPLITS = ("train", "valid", "test")


def _wikitext_zip(folder: str, split: str) -> RemoteFile:
    """A split inside an official WikiText zip: `<folder>/wiki.<split>.tokens` (or `.raw`) in `<folder>-v1.zip`."""
    member = f"wiki.{split}.{'raw' if folder.endswith('-raw') else 'tokens'}"
    url = f"{WIKITEXT_ZIPS}/{folder}-v1.zip"
    return RemoteFile((member, f"{split}.txt"), url, f"sha256:{WIKITEXT_ZIP_SHA256[folder]}", f"{folder}/{member}")


SOURCES: dict[str, NamedSource] = {
    # nanoGPT's character-level corpus: the first 90% of characters train, the last 10% validate.
    "tinyshakespeare": NamedSource(
        "tinyshakespeare",
        {
            split: RemoteFile(
                ("input.txt",),
                TINYSHAKESPEARE_URL,
                "sha256:86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",  # 1,115,394 bytes
            )
            for split in ("train", "val")
        },
        val_fraction=0.1,
    ),
    # valid and test come from pytorch/examples (sha256 of those files, 1,121,681 and 1,256,449 bytes); their
    # train.txt has no published checksum, so train is taken from the official zip (the same text, renamed).
    "wikitext-2": NamedSource(
        "wikitext-2",
        {
            "train": RemoteFile(
                ("train.txt", "wiki.train.tokens"),
                f"{WIKITEXT_ZIPS}/wikitext-2-v1.zip",
                f"sha256:{WIKITEXT_ZIP_SHA256['wikitext-2']}",
                "wikitext-2/wiki.train.tokens",
            ),
            "valid": RemoteFile(
                ("valid.txt", "wiki.valid.tokens"),
                f"{PYTORCH_WIKITEXT2}/valid.txt",
                "sha256:f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
            ),
            "test": RemoteFile(
                ("test.txt", "wiki.test.tokens"),
                f"{PYTORCH_WIKITEXT2}/test.txt",
                "sha256:d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
            ),
        },
    ),
    **{
        folder: NamedSource(folder, {split: _wikitext_zip(folder, split) for split in WIKITEXT_SPLITS})
        for folder in ("wikitext-103", "wikitext-2-raw", "wikitext-103-raw")
    },
}
PYSTDLIB = "pystdlib"

DOWNLOAD_TIMEOUT_S = 60
CHUNK_BYTES = 1 << 20


def source_names() -> list[str]:
    return sorted([*SOURCES, PYSTDLIB])


def get_source(name: str) -> NamedSource:
    if name in SOURCES:
        return SOURCES[name]
    close = difflib.get_close_matches(name, source_names(), n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise DataError(
        f"unknown data source '{name}'; {hint}the named sources are {source_names()}, "
        "or pass a local text file, folder, glob or .jsonl file with --data.path"
    )


def locate(source: NamedSource, split: str) -> Path:
    """A local file holding `split` of `source`: from the cache, the mirror, or downloaded into the cache."""
    file = source.splits[split]
    cached = cache_dir() / "sources" / source.name
    mirror = mirror_dir()
    folders = [cached] + ([mirror / source.name] if mirror else [])
    for folder in folders:
        for name in file.names:
            if (folder / name).is_file():
                return folder / name
    origin = f"{file.member} in {file.url}" if file.member else file.url
    hint = (
        f"set LLMMO_DATA_DIR to a folder that holds {source.name}/{file.names[0]} (a copy of {origin}), "
        "or train on a local file with --data.path"
    )
    if offline():
        looked = " and ".join(str(f) for f in folders)
        raise DataError(
            f"{source.name} [{split}]: none of {list(file.names)} is in {looked}, and LLMMO_OFFLINE forbids "
            f"downloading; {hint}"
        )
    dest = cached / file.names[0]
    if not file.member:
        download(file.url, dest, file.checksum, hint)
        return dest
    archive = cache_dir() / "downloads" / file.url.rsplit("/", 1)[-1]
    if not archive.is_file():  # kept: the other splits of the source are in the same archive
        download(file.url, archive, file.checksum, hint)
    extract(archive, file.member, dest)
    return dest


def download(url: str, dest: Path, checksum: str, hint: str = "") -> None:
    """Fetch `url` to `dest` with a progress bar; `dest` appears only if the content matches `checksum`."""
    algorithm, expected = checksum.split(":", 1)
    digest = hashlib.new(algorithm)
    request = urllib.request.Request(url, headers={"User-Agent": "llmmo"})  # some hosts refuse Python's default
    with atomic_path(dest) as tmp:
        try:
            with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response, tmp.open("wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(
                    total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, file=sys.stderr
                ) as bar:
                    while chunk := response.read(CHUNK_BYTES):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError; ValueError: bad URL
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            raise DataError(f"could not download {url} ({reason}); {hint}") from None
        if digest.hexdigest() != expected:
            raise DataError(
                f"the download of {url} has {algorithm} {digest.hexdigest()}, expected {expected}; it was "
                f"discarded (the file changed upstream, or the transfer was corrupted). {hint}"
            )


def extract(archive: Path, member: str, dest: Path) -> None:
    """Copy `member` out of the zip `archive` to `dest` (which appears only once it is complete)."""
    try:
        with zipfile.ZipFile(archive) as z, z.open(member) as src, atomic_path(dest) as tmp, tmp.open("wb") as out:
            shutil.copyfileobj(src, out, CHUNK_BYTES)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise DataError(
            f"cannot extract '{member}' from '{archive}' ({e}); delete the archive to download it again"
        ) from None


# Parts of the standard library that are not hand-written library code: tests, demos, the IDE, data tables
# (`encodings`, `pydoc_data`), vendored wheels, build helpers, and what pip installed (site-packages).
PYSTDLIB_SKIP = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "turtledemo", "lib2to3"}
    | {"encodings", "pydoc_data", "ensurepip", "lib-dynload", "__pycache__", "__phello__"}
)


def pystdlib_files() -> tuple[Path, list[Path]]:
    """The standard library folder and its .py files in sorted order, ASCII-only ones.

    ASCII only (about 95% of the files and bytes): the few files with a curly quote or a Greek letter would give
    a char tokenizer trained on the train split characters that the val split lacks, and an alphabet that
    differs between machines for a handful of symbols.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in PYSTDLIB_SKIP and not d.startswith("config-")]
        for name in names:
            path = Path(folder, name)
            if name.endswith(".py") and not name.startswith("_sysconfigdata") and path.read_bytes().isascii():
                files.append(path)
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise DataError(
            f"pystdlib: no Python source files under '{root}' (this Python ships compiled files only); "
            "use another --data.source or a local --data.path"
        )
    return root, files
