"""The rows a server decodes together; requests join and leave between steps (continuous batching).

Orca (Yu et al., OSDI 2022) schedules at the level of iterations: after every decoding step finished rows leave
and waiting requests join, so a short reply does not hold its place until the longest one of its batch ends,
and a new request does not wait for a whole batch to finish.

All rows share one KV cache of max_batch rows and block_size slots, and one write position `pos`: a step
writes every row's new keys at slot `pos`. A row's tokens fill slots [start, pos); slots before its start are
masked out as padding and its positions count from there (llmmo.model.KVCache's left padding). So:
- a request joins with a forward pass of its prompt alone, whose keys and values are copied into a free row,
  ending at `pos` (when the prompt is longer than `pos`, every row's slots first move right to make room);
- a row leaves by moving the last row into its place: the running rows stay rows [0, n), and a step computes
  those only;
- when `pos` reaches the end of the cache, every row's slots move left by the smallest start (slots that no row
  uses). A row that fills the whole cache has reached the model's context, and keeps its last block_size // 2
  tokens, as llmmo.generate does for one batch.
A step attends to slots [smallest start, pos] only, through a view of the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from llmmo.generate import GenerationConfig, RowText, hide_padding_ids, sample_rows, seeded_generator
from llmmo.model import KVCache


@dataclass(eq=False)  # a row is itself, whatever its fields
class Row:
    """One request being decoded."""

    prompt_ids: list[int]
    gen: GenerationConfig
    text: RowText  # its new tokens as text: stop strings, characters split across tokens
    generator: torch.Generator | None  # its own random stream when it has a seed
    owner: Any = None  # what the row is decoded for (the server's request)
    tokens: list[int] = field(init=False)  # prompt + completion; the last is fed by the next step
    new_tokens: int = 0

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt_ids)


class RunningBatch:
    """Rows [0, n) of one KV cache, decoded a token per step (see the module's docstring)."""

    def __init__(self, model: nn.Module, vocab_size: int, max_batch: int):
        cfg = model.cfg
        param = next(model.parameters())
        self.model, self.vocab_size, self.max_batch = model, vocab_size, max_batch
        self.device, self.dtype = param.device, param.dtype
        self.capacity = cfg.block_size
        self.cache = KVCache(cfg, max_batch, self.capacity, device=self.device, dtype=self.dtype)
        self.rows: list[Row] = []
        self.starts: list[int] = []  # the first slot of each row's tokens
        self.seen: torch.Tensor | None = None  # (max_batch, V) prompt and output tokens, for repetition penalties

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def full(self) -> bool:
        return len(self.rows) >= self.max_batch

    def row(self, prompt_ids: list[int], gen: GenerationConfig, text: RowText, owner: Any = None) -> Row:
        """A row to `add`, with its own random stream when seeded."""
        return Row(prompt_ids, gen, text, seeded_generator(gen.seed, self.device), owner)

    @torch.inference_mode()
    def add(self, row: Row) -> None:
        """Join: the row's prompt goes into the cache, all but its last token, which the next step feeds.

        A prompt that cannot join raises ValueError before anything changed. Any other error (out of memory)
        may leave the batch half-changed: its caller fails the batch's rows and `clear`s it."""
        if not 0 < len(row.tokens) < self.capacity:
            raise ValueError(f"a prompt of {len(row.tokens)} tokens; between 1 and {self.capacity - 1} fit")
        if not 0 <= min(row.tokens) <= max(row.tokens) < self.model.cfg.vocab_size:
            raise ValueError(f"token ids outside the model's vocabulary [0, {self.model.cfg.vocab_size})")
        if self.full:
            raise ValueError(f"the batch holds {self.max_batch} rows already")
        context = row.tokens[:-1]
        alone = self._prefill(context)  # nothing has changed yet if this fails
        if row.gen.repetition_penalty != 1 and self.seen is None:
            self.seen = torch.zeros(self.max_batch, self.model.cfg.vocab_size, dtype=torch.bool, device=self.device)
        self.rows.append(row)
        self.starts.append(self.cache.pos)
        i = len(self.rows) - 1
        if row.gen.repetition_penalty != 1:
            self.seen[i] = False
            self.seen[i, torch.tensor(row.tokens, device=self.device)] = True
        self._place(i, len(context), alone)

    def clear(self) -> None:
        """Drop every row (after a failed step: the caller has told their requests)."""
        self.rows, self.starts = [], []
        self.cache.pos = 0

    @torch.inference_mode()
    def remove(self, i: int) -> None:
        """Row i leaves; the last row moves into its place (its slots and seen tokens)."""
        last, pos = len(self.rows) - 1, self.cache.pos
        if i != last:
            start = self.starts[last]
            for t in self.cache.k + self.cache.v:
                t[i, :, start:pos] = t[last, :, start:pos]
            if self.seen is not None:
                self.seen[i] = self.seen[last]
            self.rows[i], self.starts[i] = self.rows[last], start
        self.rows.pop()
        self.starts.pop()
        if not self.rows:
            self.cache.pos = 0  # an empty batch starts over at the first slot

    @torch.inference_mode()
    def step(self) -> list[int]:
        """Feed every row its last token; return each row's next token (and append it to the row)."""
        if self.cache.pos == self.capacity:
            self._make_room()
        n, cache = len(self.rows), self.cache
        lo = min(self.starts)
        pad = torch.tensor([s - lo for s in self.starts], device=self.device)  # (n,)
        window = cache.view(n, lo, cache.pos + 1, pad)
        last = torch.tensor([[row.tokens[-1]] for row in self.rows], device=self.device)  # (n, 1)
        logits, _ = self.model(last, kv_cache=window)  # (n, 1, V)
        cache.advance(1)
        logits = logits[:, -1]
        hide_padding_ids(logits, self.vocab_size)
        gens = [row.gen for row in self.rows]
        seen = self.seen[:n] if self.seen is not None and any(g.repetition_penalty != 1 for g in gens) else None
        tokens = sample_rows(logits, gens, seen, [row.generator for row in self.rows]).tolist()
        for i, (row, token) in enumerate(zip(self.rows, tokens, strict=True)):
            row.tokens.append(token)
            row.new_tokens += 1
            if seen is not None:
                seen[i, token] = True
        return tokens

    def _prefill(self, context: list[int]) -> KVCache | None:
        """The keys and values of `context` run alone (None when it is empty)."""
        if not context:
            return None
        alone = KVCache(self.model.cfg, 1, len(context), device=self.device, dtype=self.dtype)
        self.model.hidden(torch.tensor([context], device=self.device), kv_cache=alone)  # no output head needed
        return alone

    def _place(self, i: int, m: int, alone: KVCache | None) -> None:
        """Row i's slots hold the m positions of `alone` from now on, ending at pos."""
        if m > self.cache.pos:
            self._shift(m - self.cache.pos)
        pos = self.cache.pos
        if alone is not None:
            for full, part in zip(self.cache.k + self.cache.v, alone.k + alone.v, strict=True):
                full[i, :, pos - m : pos] = part[0]
        self.starts[i] = pos - m

    def _shift(self, d: int) -> None:
        """Move every row's slots by d (right when d > 0); the rows' positions stay as they are."""
        n, pos = len(self.rows), self.cache.pos
        lo = min(self.starts)
        for t in self.cache.k + self.cache.v:
            t[:n, :, lo + d : pos + d] = t[:n, :, lo:pos].clone()  # the ranges overlap: copy first
        self.starts = [s + d for s in self.starts]
        self.cache.pos += d

    def _make_room(self) -> None:
        """pos is at the end of the cache: move the rows left by the slots none of them uses. A row that fills the
        cache has reached the model's context: it keeps its last block_size // 2 tokens (the last one to be fed)."""
        for i, row in enumerate(self.rows):
            if self.starts[i] == 0:
                context = row.tokens[-max(1, self.capacity // 2) : -1]
                self._place(i, len(context), self._prefill(context))
        self._shift(-min(self.starts))
