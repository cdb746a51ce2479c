"""The chat template: conversations <-> token ids, with role markers that are special tokens of the tokenizer.

    <|system|>You are terse.<|end|><|user|>2+2?<|end|><|assistant|>4<|end|>

The markers are added to the tokenizer as special tokens (and to the model's embedding, `add_chat_tokens`), so
they are single ids that no text can produce, and they need no character of the corpus: a char tokenizer
trained on Chinese poetry, without a Latin letter or a newline, holds them as well as a BPE does. Rendering is
plain concatenation, so a conversation round-trips exactly through `render` and the tokenizer.

Instruction tuning learns the assistant's replies only: `encode_chat` marks the assistant's content and the
`<|end|>` that closes it (so the model learns to stop), and `pack` turns marked conversations into training
rows whose other targets are -1, the loss's ignore_index.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn

from llmmo.errors import ConfigError, DataError
from llmmo.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llmmo.generate import GenerationConfig

MARKERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END = "<|end|>"
CHAT_TOKENS = (*MARKERS.values(), END)
# `render` as a transformers chat template (Jinja), written by `llmmo export`: apply_chat_template gives our ids
JINJA_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def has_chat_tokens(tokenizer: Tokenizer) -> bool:
    return all(tokenizer.hf.token_to_id(t) is not None for t in CHAT_TOKENS)


def resize_vocab(model: nn.Module, vocab_size: int) -> None:
    """Grow the token embedding (and an untied output head) to `vocab_size` rows, in place. New rows start at
    the mean of the old ones (as transformers' resize_token_embeddings does), so that the new tokens begin with
    an ordinary embedding and the old logits barely move."""
    old = model.tok_emb.weight
    if vocab_size <= old.size(0):
        return
    with torch.no_grad():
        emb = nn.Embedding(vocab_size, old.size(1), device=old.device, dtype=old.dtype)
        emb.weight[: old.size(0)] = old
        emb.weight[old.size(0) :] = old.mean(0)
        model.tok_emb = emb
        if model.cfg.tie_embeddings:
            model.lm_head = nn.Linear(old.size(1), vocab_size, bias=False, device=old.device, dtype=old.dtype)
            model.lm_head.weight = model.tok_emb.weight
        else:
            head = model.lm_head.weight
            model.lm_head = nn.Linear(head.size(1), vocab_size, bias=False, device=head.device, dtype=head.dtype)
            model.lm_head.weight[: head.size(0)] = head
            model.lm_head.weight[head.size(0) :] = head.mean(0)
    model.cfg.vocab_size = vocab_size


def add_chat_tokens(model: nn.Module, tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer with the chat markers (unchanged if it has them), the model's vocabulary grown to fit."""
    if not has_chat_tokens(tokenizer):
        tokenizer = tokenizer.with_special_tokens(CHAT_TOKENS)
    resize_vocab(model, tokenizer.vocab_size)
    return tokenizer


def _check(messages: Sequence[dict[str, str]]) -> None:
    for m in messages:
        if m.get("role") not in MARKERS:
            raise ConfigError(f"message role {m.get('role')!r} is not one of {list(MARKERS)}")
        if any(t in m.get("content", "") for t in CHAT_TOKENS):
            raise DataError(f"a {m['role']} message contains a chat marker {list(CHAT_TOKENS)}; remove it")


def render(messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The conversation as text; with `add_generation_prompt`, ending with the opening of the assistant's turn."""
    _check(messages)
    text = "".join(MARKERS[m["role"]] + m["content"] + END for m in messages)
    return text + (MARKERS["assistant"] if add_generation_prompt else "")


def encode_chat(
    tokenizer: Tokenizer, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation, and for each id whether it is the assistant's to learn: the
    content of assistant messages and the `<|end|>` that closes each.

    The whole text is encoded at once (so the ids are exactly those of the rendered text, also for tokenizers
    whose pieces depend on what precedes them, like SentencePiece's word-start marker); a token is learned when
    it starts inside an assistant's part of the text.
    """
    if not has_chat_tokens(tokenizer):
        raise ConfigError("this tokenizer has no chat markers; fine-tune it with `llmmo finetune sft` first")
    text = render(messages, add_generation_prompt)
    learned, at = [], 0  # character spans of the assistant's content and closing marker
    for m in messages:
        at += len(MARKERS[m["role"]])
        if m["role"] == "assistant":
            learned.append((at, at + len(m["content"]) + len(END)))
        at += len(m["content"]) + len(END)
    ids, offsets = tokenizer.encode_with_offsets(text)
    return ids, [any(lo <= start < hi for lo, hi in learned) for start, _ in offsets]


def pack(examples: Sequence[tuple[list[int], list[bool]]], block_size: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Training rows (x, y), each (N, block_size), from (ids, learn) examples packed whole, in order, into rows
    of block_size + 1 tokens (sequence packing, as in T5 and most SFT recipes: no compute spent on padding).

    y[i] is the token after x[i] where that token is learned, else -1; padding is x 0, y -1. An example that does
    not fit one row is cut to its first block_size + 1 tokens; one left with nothing to learn (its answer was
    cut off) is dropped, since a batch of such rows would have no loss at all. Returns x, y and the counts of
    cut and of dropped examples.
    """
    rows: list[tuple[list[int], list[bool]]] = []
    ids: list[int] = []
    learn: list[bool] = []
    cut = dropped = 0
    for example_ids, example_learn in examples:
        if len(example_ids) > block_size + 1:
            example_ids, example_learn, cut = example_ids[: block_size + 1], example_learn[: block_size + 1], cut + 1
        if not any(example_learn[1:]):  # only tokens after the first are targets
            dropped += 1
            continue
        if len(ids) + len(example_ids) > block_size + 1:
            rows.append((ids, learn))
            ids, learn = [], []
        ids, learn = ids + example_ids, learn + example_learn
    if ids:
        rows.append((ids, learn))
    x = np.zeros((len(rows), block_size), dtype=np.int64)
    y = np.full((len(rows), block_size), -1, dtype=np.int64)
    for r, (row_ids, row_learn) in enumerate(rows):
        n = len(row_ids) - 1
        x[r, :n] = row_ids[:-1]
        targets = np.asarray(row_ids[1:])
        y[r, :n] = np.where(np.asarray(row_learn[1:]), targets, -1)
    return x, y, cut, dropped


class ChatSession:
    """A conversation with a chat-tuned model: the history, the system message, and the context window.

    Each `send` renders the whole history in the template, ending with the opening of the assistant's turn, and
    streams the reply until `<|end|>`. When the history no longer fits the model's context (leaving room for a
    reply), the oldest turns are dropped (the system message stays): `dropped` counts them.
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, gen: GenerationConfig, system: str | None = None):
        if not has_chat_tokens(tokenizer):
            raise ConfigError(
                "this checkpoint's tokenizer has no chat markers: it was not instruction-tuned; "
                "fine-tune it with `llmmo finetune sft` first"
            )
        # a reply also ends where the model opens another turn instead of closing its own
        self.model, self.tokenizer = model, tokenizer
        self.gen = dataclasses.replace(gen, stop=(*gen.stop, *MARKERS.values()))
        self.system = system
        self.history: list[dict[str, str]] = []
        self.dropped = 0
        self.end_id = tokenizer.hf.token_to_id(END)

    def reset(self) -> None:
        self.history, self.dropped = [], 0

    def prompt_ids(self) -> list[int]:
        """The ids of the history (trimmed to fit) with the assistant's turn opened."""
        block = self.model.cfg.block_size
        budget = block - min(self.gen.max_new_tokens, block // 4)  # room for the start of a reply
        system = [{"role": "system", "content": self.system}] if self.system else []
        while True:
            ids, _ = encode_chat(self.tokenizer, system + self.history, add_generation_prompt=True)
            if len(ids) <= budget or len(self.history) <= 1:
                return ids[-block:]  # a single message longer than the context keeps its end
            drop = 2 if len(self.history) > 2 and self.history[1]["role"] == "assistant" else 1
            self.history, self.dropped = self.history[drop:], self.dropped + drop

    def send(self, text: str) -> Iterator[str]:
        """Add the user's message and stream the assistant's reply, which joins the history when it ends."""
        from llmmo.generate import stream_ids

        message = {"role": "user", "content": text}
        # checked before it joins the history, so that a refused message leaves the conversation as it was: chat
        # markers typed in it, characters the tokenizer cannot read (a char model's)
        _check([message])
        self.tokenizer.encode(text)
        self.history.append(message)
        reply = []
        for pieces in stream_ids(self.model, self.tokenizer, [self.prompt_ids()], self.gen, self.end_id):
            reply.append(pieces[0])
            yield pieces[0]
        self.history.append({"role": "assistant", "content": "".join(reply)})
