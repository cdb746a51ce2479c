"""From a data config to token splits ready to sample: open the corpus, fit the tokenizer, tokenize, check."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from llmmo.config import DataConfig
from llmmo.errors import DataError
from llmmo.tokenizer import Tokenizer, train_tokenizer

from .cache import cache_dir, fingerprint
from .corpus import Corpus, open_corpus, pieces
from .tokens import DOC_SEPARATOR, TokenSplit, cached_tokens


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    splits: dict[str, TokenSplit]  # by the split names that were asked for
    source: str  # a human description of the corpus
    fingerprint: str  # identifies the corpus text and the tokenizer together


def fit_tokenizer(cfg: DataConfig, corpus: Corpus | None = None) -> Tokenizer:
    """The tokenizer `cfg` asks for, trained on the train split only (so val stays unseen), and cached.

    A char tokenizer's alphabet is the exception: it is every character of the train and val splits, as nanoGPT
    takes it from the whole text. It learns nothing from their order or frequency, and a large alphabet (Chinese)
    has rare characters that occur in val only, which the model must be able to read (and be scored on).

    Cached as `$LLMMO_CACHE/tokenizers/<fingerprint of the text, kind and vocab_size>.json`.
    """
    corpus = corpus or open_corpus(cfg)
    names = (cfg.train_split, cfg.val_split) if cfg.tokenizer == "char" else (cfg.train_split,)
    splits = [corpus.split(name) for name in dict.fromkeys(names)]
    text_key = splits[0].fingerprint if len(splits) == 1 else [s.fingerprint for s in splits]
    key = fingerprint({"text": text_key, "kind": cfg.tokenizer, "vocab_size": cfg.vocab_size})
    path = cache_dir() / "tokenizers" / f"{key}.json"
    if path.is_file():
        try:
            return Tokenizer.load(path)
        except DataError:  # a damaged cache entry (it is written atomically, so by something else): trained again
            pass
    texts = (piece for split in splits for doc in split.read() for piece in pieces(doc))
    if cfg.tokenizer == "char":  # documents are joined by this character, so it must be in the alphabet
        texts = itertools.chain(texts, [DOC_SEPARATOR])
    tokenizer = train_tokenizer(cfg.tokenizer, texts, cfg.vocab_size)
    tokenizer.save(path)
    return tokenizer


def prepare_data(
    cfg: DataConfig, tokenizer: Tokenizer | None = None, splits: tuple[str, ...] | None = None
) -> PreparedData:
    """Token splits for `splits` (default: cfg.train_split and cfg.val_split), each long enough for a window.

    With `tokenizer` None, the tokenizer is trained on (or loaded for) cfg.train_split. Only the files that the
    splits need are looked up or downloaded, and text is read only when its tokens are not cached yet.
    """
    corpus = open_corpus(cfg)
    if tokenizer is None:
        tokenizer = fit_tokenizer(cfg, corpus)
    prepared: dict[str, TokenSplit] = {}
    for name in dict.fromkeys(splits or (cfg.train_split, cfg.val_split)):
        split = corpus.split(name)
        label = f"{corpus.source} [{split.name}]"
        tokens = cached_tokens(split.fingerprint, split.name, split.read, tokenizer, label)
        if len(tokens) < cfg.block_size + 1:
            fix = "use more text"
            if len(tokens) > 1:
                fix = f"lower --data.block_size (to at most {len(tokens) - 1}) or {fix}"
            raise DataError(
                f"{label} has {len(tokens)} tokens, but one window needs block_size + 1 = {cfg.block_size + 1}; {fix}"
            )
        prepared[name] = tokens
    identity = {name: f"{s.path.parent.name}/{s.path.name}" for name, s in prepared.items()}
    return PreparedData(tokenizer, prepared, corpus.source, fingerprint(identity))
