"""The decoding engine of the server: requests that wait together are decoded together, in one batch.

One worker thread owns the model. It takes up to `max_batch` waiting requests (waiting `batch_window_s` for more
to arrive once the first is there), decodes them as one batch with the KV cache, each row with its own sampling
settings, token budget and stop strings (llmmo.generate's per-row configs), and hands every row's new text to
its request as it is produced. A row ends at its end-of-text token, a stop string, its token budget, its deadline,
or when its client went away (`cancel`); the batch ends when all its rows have. Requests that arrive meanwhile
wait for the next batch; a full queue refuses new ones (`QueueFull`, HTTP 429).

This is static batching (Orca's iteration-level scheduling, where rows join a running batch, needs a KV cache
with a position per row); its gain is the same when requests come together, as a loaded server's do.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llmmo.generate import BatchDecoder, GenerationConfig, RowText, eval_mode
from llmmo.tokenizer import Tokenizer


class QueueFull(Exception):
    """The waiting queue holds max_queue requests already."""


@dataclass
class Request:
    """One generation: its prompt, settings and deadline, and where its text goes (`on_event`)."""

    prompt_ids: list[int]
    gen: GenerationConfig
    on_event: Callable[[dict], None]  # called from the worker thread: {"text"} pieces, then {"finish_reason", ...}
    deadline: float | None = None  # time.monotonic() after which the row ends (finish_reason "length")
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        """The client went away: the row ends at the next step and frees its place."""
        self.cancelled.set()


@dataclass
class EngineStats:
    """What /metrics reports, updated by the worker."""

    waiting: int = 0
    running: int = 0
    batches: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # by finish reason


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        eos_id: int | None,
        max_batch: int = 8,
        max_queue: int = 64,
        batch_window_s: float = 0.005,
    ):
        self.model, self.tokenizer, self.eos_id = model.eval(), tokenizer, eos_id
        self.max_batch, self.max_queue, self.batch_window_s = max_batch, max_queue, batch_window_s
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.stats = EngineStats()
        self._lock = threading.Lock()  # guards the count of waiting requests against two submits at once
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmmo-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the batch in progress; requests still waiting get an error (none is left hanging)."""
        self._stop.set()
        self._thread.join(timeout=30)
        while not self.waiting.empty():
            self.waiting.get_nowait().on_event({"error": "the server is shutting down"})

    def submit(self, request: Request) -> None:
        with self._lock:
            if self.stats.waiting >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are waiting already")
            self.stats.waiting += 1
        self.waiting.put(request)

    def _take(self) -> list[Request]:
        """The next batch: the first waiting request, and those that arrive within the batch window."""
        try:
            first = self.waiting.get(timeout=0.1)
        except queue.Empty:
            return []
        batch, until = [first], time.monotonic() + self.batch_window_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self.waiting.get(timeout=max(0.0, until - time.monotonic())))
            except queue.Empty:
                break
        with self._lock:
            self.stats.waiting -= len(batch)
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = []
            for r in self._take():
                if r.cancelled.is_set():  # its client left while it waited
                    self._count("cancelled", 0)
                    r.on_event({"finish_reason": "cancelled", "completion_tokens": 0, "prompt_tokens": 0})
                else:
                    batch.append(r)
            if batch:
                self.stats.running = len(batch)
                try:
                    self._decode(batch)
                except Exception as e:  # a failed batch fails its requests, never the server
                    for r in batch:
                        r.on_event({"error": f"{type(e).__name__}: {e}"})
                self.stats.running = 0

    @torch.inference_mode()
    def _decode(self, batch: list[Request]) -> None:
        self.stats.batches += 1
        decoder = BatchDecoder(
            self.model,
            [r.prompt_ids for r in batch],
            [r.gen for r in batch],
            self.eos_id,
            vocab_size=self.tokenizer.vocab_size,
        )
        rows = [RowText(self.tokenizer, r.prompt_ids, r.gen.stop) for r in batch]
        reasons: list[str | None] = [None] * len(batch)
        self.stats.prompt_tokens += sum(len(r.prompt_ids) for r in batch)
        with eval_mode(self.model):
            while True:
                now = time.monotonic()
                for b, r in enumerate(batch):  # clients gone or out of time: their rows end now
                    if reasons[b] is None and (r.cancelled.is_set() or (r.deadline is not None and now > r.deadline)):
                        reasons[b] = "cancelled" if r.cancelled.is_set() else "length"
                        decoder.finish(b)
                        self._end(r, rows[b], reasons[b], decoder.new_tokens[b])
                if decoder.finished:
                    break
                tokens = decoder.step()
                for b, (r, row, token) in enumerate(zip(batch, rows, tokens, strict=True)):
                    if token is None or reasons[b] is not None:
                        continue
                    piece = row.finish() if token == self.eos_id else row.push(token)
                    if piece:
                        r.on_event({"text": piece})
                    if row.done or decoder.done[b]:
                        decoder.finish(b)
                        stopped = row.stopped or token == self.eos_id
                        reasons[b] = "stop" if stopped else "length"
                        self._end(r, row, reasons[b], decoder.new_tokens[b])
        for b, r in enumerate(batch):  # rows still open when the batch's budget ran out
            if reasons[b] is None:
                self._end(r, rows[b], "length", decoder.new_tokens[b])

    def _count(self, reason: str, completion_tokens: int) -> None:
        self.stats.completion_tokens += completion_tokens
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1

    def _end(self, request: Request, row: RowText, reason: str, completion_tokens: int) -> None:
        rest = "" if row.done else row.finish()
        if rest and reason != "cancelled":
            request.on_event({"text": rest})
        self._count(reason, completion_tokens)
        request.on_event(
            {"finish_reason": reason, "completion_tokens": completion_tokens, "prompt_tokens": len(request.prompt_ids)}
        )
