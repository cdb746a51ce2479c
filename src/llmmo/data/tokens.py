"""A split's token ids, computed once and kept as a memory-mapped file in the cache.

Layout: `$LLMMO_CACHE/tokens/<key>/<split>.bin` holds the ids (uint16 when the vocabulary fits, else uint32) and
`<split>.json` holds {"n_tokens", "dtype", "n_bytes"}, n_bytes being the UTF-8 bytes of the split's documents.
The key is a fingerprint of the split's text (its files and how they are cut) and of the tokenizer, so a changed
file or another tokenizer gets a new entry, and an unchanged one is reused without reading any text. The .json
is written after the .bin, so its presence says the .bin is complete.

Documents are joined so that a model sees where one ends and the next begins:
- bpe: `<|endoftext|>` after every document (GPT-2's convention);
- word: `<eos>` after every document that does not already end with one (a final newline is already `<eos>`);
- char, which has no end-of-text token: "\\n" between documents (the char alphabet always includes it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmmo.errors import DataError
from llmmo.fileio import atomic_path, write_text_atomic
from llmmo.tokenizer import Tokenizer

from .cache import cache_dir, file_identity, fingerprint
from .corpus import list_text_files, nonempty, pieces, read_documents

DOC_SEPARATOR = "\n"  # between documents, for tokenizers without an end-of-text id (char)
BATCH_CHARS = 8 << 20  # characters encoded per `encode_batch` call: parallel, yet bounded in memory


@dataclass
class TokenSplit:
    tokens: np.memmap  # 1-D token ids, read-only
    n_bytes: int  # UTF-8 bytes of the text the tokens encode
    path: Path  # the .bin file

    def __len__(self) -> int:
        return len(self.tokens)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 1 << 16 else np.uint32)


def cached_tokens(
    text_fingerprint: str, name: str, read: Callable[[], list[str]], tokenizer: Tokenizer, label: str
) -> TokenSplit:
    """The tokens of the documents `read()` returns, from the cache, or encoded and cached now.

    `text_fingerprint` must change whenever those documents do, and at least one of them must hold text;
    `label` names the split in error messages.
    """
    key = fingerprint({"text": text_fingerprint, "tokenizer": tokenizer.fingerprint})
    bin_path = cache_dir() / "tokens" / key / f"{name}.bin"
    meta_path = bin_path.with_suffix(".json")
    cached = _load(bin_path, meta_path, tokenizer.vocab_size)
    if cached is not None:
        return cached
    documents = read()
    dtype = token_dtype(tokenizer.vocab_size)
    n_tokens = 0
    with atomic_path(bin_path) as tmp, tmp.open("wb") as out:
        try:
            for ids in encode_documents(documents, tokenizer):
                out.write(ids.astype(dtype).tobytes())
                n_tokens += len(ids)
        except DataError as e:  # e.g. a character outside a char tokenizer's alphabet
            raise DataError(f"{label}: {e}") from None
    meta = {"n_tokens": n_tokens, "dtype": dtype.name, "n_bytes": sum(len(d.encode("utf-8")) for d in documents)}
    write_text_atomic(meta_path, json.dumps(meta))
    return TokenSplit(np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,)), meta["n_bytes"], bin_path)


def _load(bin_path: Path, meta_path: Path, vocab_size: int) -> TokenSplit | None:
    """A complete cache entry, or None when there is none (or it is damaged: then it is rebuilt). Damaged: a
    size other than its record's, or ids the tokenizer does not have (overwritten bytes; found in one pass over
    the ids, 0.03 s for 200 million in memory)."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype, n_tokens = np.dtype(meta["dtype"]), int(meta["n_tokens"])
        if n_tokens <= 0 or bin_path.stat().st_size != n_tokens * dtype.itemsize:
            return None
        tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,))
        if tokens.max() >= vocab_size:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return TokenSplit(tokens, int(meta["n_bytes"]), bin_path)


def encode_documents(documents: Iterable[str], tokenizer: Tokenizer) -> Iterator[np.ndarray]:
    """The ids of the documents joined as the module docstring says, as consecutive int64 arrays."""
    eot = tokenizer.eot_id
    started = False
    for batch in _batches(_document_pieces(documents, _cuts_safely(tokenizer))):
        out: list[int] = []
        for (_, first, last), ids in zip(batch, tokenizer.encode_batch([text for text, _, _ in batch]), strict=True):
            if first and started and eot is None:
                out.extend(tokenizer.encode(DOC_SEPARATOR))
            started = True
            out.extend(ids)
            if last and eot is not None and (not ids or ids[-1] != eot):
                out.append(eot)
        yield np.array(out, dtype=np.int64)


def _cuts_safely(tokenizer: Tokenizer) -> bool:
    """Whether a document cut where `pieces` cuts encodes to the ids of the whole. llmmo's tokenizers do; an
    imported one is tried on such cuts (a Metaspace pre-tokenizer, which marks the start of every text with
    "▁", does not: its documents are encoded whole, in memory that grows with the document)."""
    if tokenizer.kind != "hf":
        return True
    cuts = [("word\n", "word"), ("Hello, world.\n", "Next line"), ("12\n", "34"), ("é\n", "ü")]
    return all(tokenizer.encode(a + b) == tokenizer.encode(a) + tokenizer.encode(b) for a, b in cuts)


def _document_pieces(documents: Iterable[str], cut: bool) -> Iterator[tuple[str, bool, bool]]:
    """(piece, first of its document, last of its document) for the non-empty documents (whole unless `cut`)."""
    for doc in documents:
        if doc:
            parts = list(pieces(doc)) if cut else [doc]
            for i, part in enumerate(parts):
                yield part, i == 0, i == len(parts) - 1


def _batches(items: Iterator[tuple[str, bool, bool]]) -> Iterator[list[tuple[str, bool, bool]]]:
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += len(item[0])
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenize_file(
    path: str | Path, tokenizer: Tokenizer, encoding: str = "utf-8", text_field: str = "text"
) -> TokenSplit:
    """All the text at `path` (a file, folder, glob or .jsonl, as `data.path` takes), as one cached split.

    For `llmmo eval CKPT --file x.txt`: nothing is held out, and at least 2 tokens are needed to predict one.
    """
    files, _ = list_text_files(str(path))
    identity = {"files": [file_identity(f) for f in files], "encoding": encoding, "text_field": text_field}

    def read() -> list[str]:
        return nonempty([doc for f in files for doc in read_documents(f, encoding, text_field)], "all", str(path))

    split = cached_tokens(fingerprint(identity), "all", read, tokenizer, str(path))
    if len(split) < 2:
        raise DataError(f"'{path}' encodes to {len(split)} token; evaluating needs at least 2 (one to predict)")
    return split
