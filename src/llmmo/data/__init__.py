"""Data: named and local corpora, tokenized once into cached memmaps, and the samplers that batch them.

    data = prepare_data(cfg.data)                      # tokenizer + token splits, cached under $LLMMO_CACHE
    sampler = RandomWindows(data.splits["train"].tokens, block_size, batch_size, seed)
    x, y = sampler.batch(step)                         # (B, T) int64; y is x shifted by one token

Modules: `sources` (named corpora, mirror and download), `corpus` (reading and splitting text), `tokens`
(the token cache), `prepare` (tying them together), `sampler` (training and evaluation windows).
"""

from .corpus import LoadedCorpus, load_corpus, open_corpus
from .prepare import PreparedData, fit_tokenizer, prepare_data
from .sampler import EpochWindows, RandomWindows, eval_windows
from .sources import source_names
from .tokens import TokenSplit, tokenize_file

__all__ = [
    "EpochWindows",
    "LoadedCorpus",
    "PreparedData",
    "RandomWindows",
    "TokenSplit",
    "eval_windows",
    "fit_tokenizer",
    "load_corpus",
    "open_corpus",
    "prepare_data",
    "source_names",
    "tokenize_file",
]
