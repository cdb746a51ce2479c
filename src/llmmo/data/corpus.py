"""Text corpora: find the files, read them as documents, cut them into train and validation splits.

A corpus is opened without reading any text: each split knows its files and a fingerprint of them (path, size,
modification time, and how they are cut), so that a cached tokenization is found without touching the text.
The text is read only when a split has to be tokenized, or a tokenizer trained on it.

Local text (`data.path`) is a text file, a folder (every file below it, recursively, hidden ones and binary
ones skipped), a glob, or a .jsonl/.json file whose records' `data.text_field` holds each document's text (a
folder or glob may mix both). It is split into train and val:
- one document: the first (1 - val_fraction) of its characters train, the rest validate (nanoGPT's split);
- several: every k-th document validates, k = round(1 / val_fraction) (the last document when there are
  fewer than k), so that both splits sample the whole corpus rather than its beginning and its end.
Texts are kept exactly as in the file (no newline translation), so that byte counts are those of the file.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llmmo.config import DataConfig
from llmmo.errors import DataError
from llmmo.fileio import is_glob

from .cache import file_identity, fingerprint
from .sources import PYSTDLIB, NamedSource, get_source, locate, pystdlib_files

VAL_NAMES = ("val", "valid", "validation")  # one split, three spellings: each is accepted for the others
BINARY_SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB marks a binary file (git's heuristic)
PIECE_CHARS = 1 << 20


@dataclass(frozen=True)
class CorpusSplit:
    """One split of a corpus: its canonical name, the fingerprint of its text, and how to read it."""

    name: str
    fingerprint: str
    read: Callable[[], list[str]]  # the split's documents


class Corpus:
    """A corpus opened but not read: `source` describes it, `split(name)` gives one of its splits."""

    source: str
    split_names: tuple[str, ...]

    def split(self, name: str) -> CorpusSplit:
        raise NotImplementedError

    def canonical(self, name: str) -> str:
        """The corpus's own name for split `name`: itself, or another spelling of "val"."""
        if name in self.split_names:
            return name
        if name in VAL_NAMES:
            for alias in VAL_NAMES:
                if alias in self.split_names:
                    return alias
        raise DataError(
            f"{self.source} has no split '{name}'; its splits are {list(self.split_names)} "
            "(set --data.train_split / --data.val_split)"
        )


class NamedCorpus(Corpus):
    """A named source: one file per split (WikiText), or one file cut by characters (tinyshakespeare)."""

    def __init__(self, named: NamedSource):
        self.named = named
        self.source = named.name
        self.split_names = tuple(named.splits)

    def split(self, name: str) -> CorpusSplit:
        name = self.canonical(name)
        path = locate(self.named, name)  # the only place a download can happen: just this split's file
        identity = {
            "source": self.named.name,
            "split": name,
            "file": file_identity(path),
            "val_fraction": self.named.val_fraction,
        }
        return CorpusSplit(name, fingerprint(identity), functools.partial(self._read, name, path))

    def _read(self, name: str, path: Path) -> list[str]:
        text = read_text(path, "utf-8")
        if self.named.val_fraction > 0:
            text = cut_by_characters(text, self.named.val_fraction)[name]
        return nonempty([text], name, self.source)


class LocalCorpus(Corpus):
    """Documents from local files, cut into train and val (see the module docstring)."""

    split_names = ("train", "val")

    def __init__(self, files: list[Path], source: str, encoding: str, text_field: str, val_fraction: float):
        self.files, self.source = files, source
        self.encoding, self.text_field, self.val_fraction = encoding, text_field, val_fraction
        self.identity = {
            "files": [file_identity(f) for f in files],
            "encoding": encoding,
            "text_field": text_field,
            "val_fraction": val_fraction,
        }

    def split(self, name: str) -> CorpusSplit:
        name = self.canonical(name)
        return CorpusSplit(name, fingerprint(self.identity | {"split": name}), lambda: self._splits[name])

    @functools.cached_property
    def _splits(self) -> dict[str, list[str]]:
        documents = [doc for path in self.files for doc in read_documents(path, self.encoding, self.text_field)]
        if not any(documents):
            raise DataError(f"{self.source} holds no text (every document is empty); point --data.path at text")
        splits = split_documents(documents, self.val_fraction)
        return {name: nonempty(docs, name, self.source) for name, docs in splits.items()}


def open_corpus(cfg: DataConfig) -> Corpus:
    """The corpus that `cfg` names: `cfg.path` when set, else the named `cfg.source`. Reads no text."""
    if cfg.path:
        files, skipped = list_text_files(cfg.path)
        source = f"{cfg.path} ({len(files)} file{'s' * (len(files) != 1)}"
        if skipped:
            shown = ", ".join(str(p) for p in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
            source += f"; skipped {len(skipped)} binary file{'s' * (len(skipped) != 1)}: {shown}"
        return LocalCorpus(files, source + ")", cfg.encoding, cfg.text_field, cfg.val_fraction)
    if cfg.source == PYSTDLIB:
        root, files = pystdlib_files()
        return LocalCorpus(files, f"{PYSTDLIB} ({len(files)} files under {root})", "utf-8", "text", 0.1)
    return NamedCorpus(get_source(cfg.source))


@dataclass
class LoadedCorpus:
    source: str  # a human description of where the text came from
    splits: dict[str, list[str]]  # requested split name -> its documents


def load_corpus(cfg: DataConfig, splits: tuple[str, ...] | None = None) -> LoadedCorpus:
    """The documents of `splits` (default: train and val splits of `cfg`), read into memory."""
    corpus = open_corpus(cfg)
    names = splits or (cfg.train_split, cfg.val_split)
    return LoadedCorpus(corpus.source, {name: corpus.split(name).read() for name in names})


# ------------------------------------------------------------------------------------------- local files


def list_text_files(path: str) -> tuple[list[Path], list[Path]]:
    """The text files that `data.path` stands for, in sorted order, and the binary files it skipped."""
    hint = "pass an existing text file, folder, glob or .jsonl file with --data.path"
    if is_glob(path) and not Path(path).expanduser().exists():  # a name that exists is that file or folder
        candidates = sorted(Path(p) for p in glob.glob(os.path.expanduser(path), recursive=True))
        candidates = [p for p in candidates if p.is_file()]
        if not candidates:
            raise DataError(f"data.path '{path}' matches no files; {hint}")
    else:
        root = Path(path).expanduser()
        if root.is_file():
            offset = binary_offset(root)
            if offset is not None:
                raise DataError(f"'{root}' is not a text file (a NUL byte at offset {offset}); {hint}")
            return [root], []
        if not root.is_dir():
            raise DataError(f"data.path '{path}' does not exist; {hint}")
        candidates = sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p.relative_to(root)))
        if not candidates:
            raise DataError(f"folder '{root}' holds no files; {hint}")
    text, skipped = [], []
    for p in candidates:
        (text if binary_offset(p) is None else skipped).append(p)
    if not text:
        raise DataError(f"data.path '{path}' holds only binary files ({len(skipped)}); {hint}")
    return text, skipped


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def binary_offset(path: Path) -> int | None:
    """Where the first NUL byte is in the first 8 KiB of the file, or None for a text file."""
    with path.open("rb") as f:
        offset = f.read(BINARY_SNIFF_BYTES).find(b"\0")
    return None if offset < 0 else offset


def read_text(path: Path, encoding: str) -> str:
    """The file's text, exactly; a clear error naming the file, the byte offset and the option to fix it."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read '{path}': {e.strerror}") from None
    try:
        return data.decode(encoding)
    except LookupError:
        raise DataError(
            f"unknown text encoding '{encoding}'; set --data.encoding (llmmo eval: --encoding) to a Python codec name"
        ) from None
    except UnicodeDecodeError as e:
        raise DataError(
            f"'{path}' is not valid {encoding}: byte 0x{data[e.start]:02x} at byte offset {e.start} ({e.reason}); "
            "set --data.encoding (llmmo eval: --encoding) to the file's encoding (e.g. latin-1 or cp1252), or convert "
            "the file to UTF-8"
        ) from None


def read_documents(path: Path, encoding: str, text_field: str) -> list[str]:
    """The `text_field` of each record of a .jsonl file (one JSON object per line) or of a .json file that holds an
    array of objects; any other file's whole text as one document. A field holding a list of strings (a poem's
    lines) is joined with newlines."""
    text = read_text(path, encoding)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json"):
        return [text]
    records: list[tuple[str, object]] = []
    if suffix == ".json":
        try:
            tree = json.loads(text)
        except json.JSONDecodeError:
            tree = None
        if not isinstance(tree, list):  # not an array of records (a config, metadata): plain text, as before
            return [text]
        records = [(f"{path}[{i}]", record) for i, record in enumerate(tree)]
    for lineno, line in enumerate(text.split("\n") if suffix == ".jsonl" else [], start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno}); each line of a .jsonl file "
                "must be one JSON object"
            ) from None
    return [_field_text(where, record, text_field) for where, record in records]


def _field_text(where: str, record: object, text_field: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        fields = list(record) if isinstance(record, dict) else f"a JSON {type(record).__name__}"
        raise DataError(
            f"{where}: no field '{text_field}' (the record has {fields}); "
            "set --data.text_field to the field that holds the text"
        )
    value = record[text_field]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = "\n".join(value)
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field '{text_field}' holds a {type(value).__name__}, not text; "
            "set --data.text_field to the field that holds the text"
        )
    return value


# ------------------------------------------------------------------------------------------------ splits


def cut_by_characters(text: str, val_fraction: float) -> dict[str, str]:
    """The first (1 - val_fraction) of the characters train, the rest validate."""
    cut = int(len(text) * (1 - val_fraction))
    return {"train": text[:cut], "val": text[cut:]}


def split_documents(documents: list[str], val_fraction: float) -> dict[str, list[str]]:
    if len(documents) == 1:
        return {name: [text] for name, text in cut_by_characters(documents[0], val_fraction).items()}
    k = max(2, round(1 / val_fraction))
    if len(documents) < k:
        return {"train": documents[:-1], "val": documents[-1:]}
    return {
        "train": [d for i, d in enumerate(documents) if i % k != k - 1],
        "val": [d for i, d in enumerate(documents) if i % k == k - 1],
    }


def nonempty(documents: list[str], split: str, source: str) -> list[str]:
    if not any(documents):
        raise DataError(
            f"split '{split}' of {source} is empty; give it more text (or a larger --data.val_fraction for val)"
        )
    return documents


# Cut only after a newline that follows a non-space and precedes one: there, every tokenizer here (chars, words,
# GPT-2's byte-level pre-tokenizer) splits anyway, so pieces encode to exactly the ids of the whole text.
_CUT = re.compile(r"(?<=\S)\n(?=\S)")


def pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of about `size` characters, so that huge documents encode in bounded memory."""
    start = 0
    while len(text) - start > size:
        cut = _CUT.search(text, start + size)
        if cut is None:
            break
        yield text[start : cut.end()]
        start = cut.end()
    yield text[start:]
