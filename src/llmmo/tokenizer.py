"""Tokenizers: text <-> token ids, saved as a Hugging Face `tokenizers` JSON file beside the weights.

Three kinds, all stored in the one format so that `tokenizers.Tokenizer.from_file` (and transformers'
`PreTrainedTokenizerFast`) can load them without llmmo:
- char: one id per Unicode code point seen in the training text, in sorted order (nanoGPT's ids). Exact
  round trip of any text over that alphabet; a character outside it is an error, not a silent `<unk>`.
- word: whitespace-separated words, the N-2 most frequent kept, `<unk>` for the rest and `<eos>` for each
  line end (as PyTorch's word_language_model does). LOSSY: spacing is not kept and rare words become `<unk>`.
  WikiText's own `<unk>` maps to ours.
- bpe: byte-level BPE (GPT-2's scheme) trained on the corpus: exact round trip of any Unicode text.
A fourth kind, hf, is any other tokenizer.json (e.g. the SentencePiece-style BPE of a Llama folder on the Hub,
with Metaspace and byte fallback), brought in by `llmmo import`: used as it is, never trained by llmmo.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from llmmo.errors import DataError
from llmmo.fileio import write_text_atomic

UNK, EOS, EOT = "<unk>", "<eos>", "<|endoftext|>"
KINDS = ("char", "word", "bpe")  # the kinds llmmo trains
HF = "hf"  # any other tokenizer.json, used as it is (see the module docstring)
CHAR_PATTERN = "(?m)."  # the char kind's pre-tokenizer regex: one piece per character, newlines included
# An hf tokenizer's end of text: the first of these that it holds as a special token (GPT-2, Llama 3, Llama 2 and
# Mistral, Gemma, ChatML), as the ids in a foreign folder's config.json are not part of tokenizer.json.
END_OF_TEXT = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")


class Tokenizer:
    """A trained tokenizer of one of the `KINDS`; wraps the `tokenizers` object that defines it."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        self.kind = _kind_of(hf)
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        # char: encode in Python, 100x faster than a per-character regex split, and the same ids (tested)
        self._char_ids = hf.get_vocab() if self.kind == "char" else None
        # added special tokens longer than a character (chat markers): a char tokenizer cuts them out first
        added = [t.content for t in hf.get_added_tokens_decoder().values() if t.special and len(t.content) > 1]
        self._specials = re.compile("(" + "|".join(map(re.escape, sorted(added, key=len, reverse=True))) + ")")
        self._specials = self._specials if added else None
        if self.kind == HF:
            specials = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
            eot = next((hf.token_to_id(t) for t in END_OF_TEXT if t in specials), None)
        else:
            eot = hf.token_to_id(EOT if self.kind == "bpe" else EOS)
        # the id that ends a document (bpe, hf) or a line (word); None for char and for hf ones without one
        self.eot_id: int | None = eot
        # the id that ends generated text: a word tokenizer's <eos> ends a line only
        self.text_end_id: int | None = eot if self.kind in ("bpe", HF) else None

    def encode(self, text: str) -> list[int]:
        if self._char_ids is not None and self._specials is not None:
            pieces = self._specials.split(text)  # odd positions hold the special tokens
            return [i for n, p in enumerate(pieces) for i in ([self._char_ids[p]] if n % 2 else self._chars(p))]
        if self._char_ids is not None:
            return self._chars(text)
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of `text`, and the (start, end) character offsets in `text` of each token."""
        if self._char_ids is None:
            encoding = self.hf.encode(text, add_special_tokens=False)
            return encoding.ids, list(encoding.offsets)
        pieces = self._specials.split(text) if self._specials is not None else [text]
        offsets, at = [], 0
        for n, piece in enumerate(pieces):  # a special token, or one token per character
            offsets += [(at, at + len(piece))] if n % 2 else [(i, i + 1) for i in range(at, at + len(piece))]
            at += len(piece)
        return self.encode(text), offsets

    def _chars(self, text: str) -> list[int]:
        unknown = set(text).difference(self._char_ids)
        if unknown:
            shown = ", ".join(repr(c) for c in sorted(unknown)[:5])
            raise DataError(
                f"characters {shown} are not in this char tokenizer's vocabulary ({len(unknown)} unknown): a char "
                "model reads only the characters of the text it was trained on; leave them out, or train on text "
                "that has them (or with --data.tokenizer bpe, which reads any text)"
            )
        ids = self._char_ids
        return [ids[c] for c in text]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._char_ids is not None:
            return [self.encode(t) for t in texts]
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids back to text; special tokens are kept, so that bpe and char round trips are exact."""
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of text each id stands for (special tokens 0), for bits per byte."""
        out = np.zeros(self.vocab_size, dtype=np.int64)
        specials = {t.content for t in self.hf.get_added_tokens_decoder().values()}
        if self.kind == HF:
            return _foreign_token_bytes(self.hf, out, specials)
        for token, i in self.hf.get_vocab(with_added_tokens=True).items():
            if token in specials and token != UNK:
                continue
            if self.kind == "bpe":
                out[i] = len(token)  # byte-level alphabet: one character per byte
            elif self.kind == "char":
                out[i] = len(token.encode("utf-8"))
            else:
                out[i] = len(token.encode("utf-8")) + 1  # the word and the space that separates it
        if self.kind == "word":
            out[self.hf.token_to_id(EOS)] = 1  # the newline
        return out

    def with_special_tokens(self, tokens: Sequence[str]) -> Tokenizer:
        """A copy with `tokens` added as special tokens (ids after the current ones; ones it has are kept)."""
        hf = HFTokenizer.from_str(self.to_json())
        hf.add_special_tokens(list(tokens))
        return Tokenizer(hf)

    def to_json(self) -> str:
        return self.hf.to_str()

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json (through a temporary file, so a crash never leaves half a file)."""
        write_text_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer file '{path}' does not exist; train one with `llmmo tokenizer train`")
        try:
            return cls(HFTokenizer.from_str(path.read_text(encoding="utf-8")))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(f"tokenizer file '{path}' is not a valid tokenizer.json ({e}); re-save it") from None

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


def _kind_of(hf: HFTokenizer) -> str:
    """Recognise which of our kinds a tokenizer.json is, from its model and pre-tokenizer; hf for any other."""
    spec = json.loads(hf.to_str())
    model, pre = spec["model"]["type"], spec.get("pre_tokenizer") or {}
    if model == "BPE" and pre.get("type") == "ByteLevel":
        return "bpe"
    # char encodes in Python, one id per character: only for exactly our pre-tokenizer
    if model == "WordLevel" and pre.get("type") == "Split" and pre.get("pattern") == {"Regex": CHAR_PATTERN}:
        return "char"
    if model == "WordLevel" and pre.get("type") == "WhitespaceSplit":
        return "word"
    return HF


def _foreign_token_bytes(hf: HFTokenizer, out: np.ndarray, specials: set[str]) -> np.ndarray:
    """`Tokenizer.token_bytes` for an hf tokenizer: exact for byte-level BPE and byte-fallback tokens; a
    Metaspace "▁" counts as the space it stands for and a WordPiece "##" as nothing. Other schemes (e.g. a
    normalizer that rewrites text) make it an estimate: bits per byte are then approximate."""
    spec = json.loads(hf.to_str())
    byte_level = "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    continuing = spec["model"].get("continuing_subword_prefix") or ""
    for token, i in hf.get_vocab(with_added_tokens=True).items():
        if token in specials:
            continue
        if byte_level:
            out[i] = len(token)  # byte-level alphabet: one character per byte
        elif spec["model"].get("byte_fallback") and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            out[i] = 1
        else:
            if continuing and token.startswith(continuing):
                token = token[len(continuing) :]
            out[i] = len(token.replace("\u2581", " ").encode("utf-8"))
    return out


def char_tokenizer(texts: Iterable[str]) -> Tokenizer:
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    if not chars:
        raise DataError("cannot train a char tokenizer on empty text")
    vocab = {c: i for i, c in enumerate(sorted(chars))}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))  # UNK is not in the vocab: unknown chars fail
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(CHAR_PATTERN), behavior="isolated")  # Oniguruma: (?m) is dotall
    hf.decoder = decoders.Fuse()
    return Tokenizer(hf)


def word_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text.split())
    counts.pop(UNK, None)
    counts.pop(EOS, None)
    if not counts:
        raise DataError("cannot train a word tokenizer on text without words")
    if vocab_size < 3:
        raise DataError(f"a word tokenizer needs vocab_size >= 3 (<unk>, <eos> and a word), got {vocab_size}")
    # most frequent first; ties in order of first appearance (Counter keeps insertion order): deterministic
    words = [w for w, _ in counts.most_common(vocab_size - 2)]
    vocab = {UNK: 0, EOS: 1} | {w: i + 2 for i, w in enumerate(words)}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
    hf.normalizer = normalizers.Replace("\n", f" {EOS} ")
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens([UNK, EOS])
    return Tokenizer(hf)


def bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOT],
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer)
    return Tokenizer(hf)


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int = 0) -> Tokenizer:
    """Train a tokenizer of `kind` on `texts`. vocab_size is ignored for char (the alphabet sets it)."""
    if kind == "char":
        return char_tokenizer(texts)
    if kind == "word":
        return word_tokenizer(texts, vocab_size or 10000)
    if kind == "bpe":
        return bpe_tokenizer(texts, vocab_size or 4096)
    raise DataError(f"unknown tokenizer kind '{kind}'; choose one of {KINDS}")
