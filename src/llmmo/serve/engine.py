"""The decoding engine of the server: one worker thread decodes every running request, a token per step.

The worker owns the model and a running batch of up to `max_batch` rows (llmmo.serve.batch: continuous
batching). Between two steps, rows whose reply ended leave, and waiting requests join. Each row has its own
sampling settings, token budget and stop strings, and its new text goes to its request as it is produced
(`on_event`). A row ends at its end-of-text token, a stop string, its token budget, its deadline, or when its
client went away (`cancel`). A full queue refuses new requests (`QueueFull`, HTTP 429).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llmmo.generate import GenerationConfig, RowText, eval_mode
from llmmo.serve.batch import RunningBatch
from llmmo.tokenizer import Tokenizer


def decoding_threads(requested: int) -> int:
    """`requested`, or all cores this process may use but one. On a small CPU this matters: a decoding step
    that takes every core leaves the HTTP side waiting behind it (and OpenMP's idle threads spin), which cost
    40% of the throughput on 2 cores (docs/LOG.md)."""
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


class QueueFull(Exception):
    """The waiting queue holds max_queue requests already."""


class EngineStopped(Exception):
    """The engine takes no more requests: the server is shutting down, or its engine process ended."""


@dataclass
class Request:
    """One generation: its prompt, settings and deadline, and where its text goes (`on_event`)."""

    prompt_ids: list[int]
    gen: GenerationConfig
    on_event: Callable[[dict], None]  # called from the worker thread: {"text"} pieces, then {"finish_reason", ...}
    deadline: float | None = None  # time.monotonic() after which the row ends (finish_reason "length")
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    first_text: float | None = None  # when its first text went out
    on_cancel: Callable[[], None] | None = None  # tells an engine in another process (llmmo.serve.worker)

    def send_text(self, piece: str) -> None:
        if self.first_text is None:
            self.first_text = time.monotonic()
        self.on_event({"text": piece})

    def cancel(self) -> None:
        """The client went away: the row ends at the next step and frees its place."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            if self.on_cancel is not None:
                self.on_cancel()


@dataclass
class EngineStats:
    """What /metrics reports, updated by the worker."""

    waiting: int = 0
    running: int = 0
    steps: int = 0  # decoding steps (one token for every running row)
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
        threads: int = 0,
        on_step: Callable[[], None] | None = None,
    ):
        self.model, self.tokenizer, self.eos_id = model.eval(), tokenizer, eos_id
        self.max_batch, self.max_queue, self.threads = max_batch, max_queue, threads
        self.on_step = on_step  # called by the worker after every round of admissions and a step
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.batch = RunningBatch(model, tokenizer.vocab_size, max_batch)  # rows owned by their Request
        self.stats = EngineStats()
        self._lock = threading.Lock()  # guards the count of waiting requests against two submits at once
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmmo-engine", daemon=True)

    def start(self) -> None:
        """Start the worker thread. Sets torch's CPU threads for the whole process (`decoding_threads`)."""
        torch.set_num_threads(decoding_threads(self.threads))
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def stop(self) -> None:
        """Stop after the step in progress; requests still running or waiting get an error (none is left hanging).
        An HTTP server stops its engine once its requests are answered (uvicorn's graceful shutdown)."""
        with self._lock:  # no submit lands after the queue is emptied below
            self._stop.set()
        self._thread.join(timeout=30)
        if not self._thread.is_alive():  # else its rows are still its own; the daemon thread ends with us
            for row in self.batch.rows:
                row.owner.on_event({"error": "the server is shutting down"})
        while not self.waiting.empty():
            self.waiting.get_nowait().on_event({"error": "the server is shutting down"})

    def submit(self, request: Request) -> None:
        with self._lock:
            if self._stop.is_set():
                raise EngineStopped("the server is shutting down")
            if self.stats.waiting >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are waiting already")
            self.stats.waiting += 1
            self.waiting.put(request)

    def _run(self) -> None:
        with eval_mode(self.model):
            while not self._stop.is_set():
                try:
                    self._admit()
                    if self.batch.rows:
                        self._step()
                except Exception as e:  # a failed step (out of memory) fails its requests, never the server
                    for row in self.batch.rows:
                        with contextlib.suppress(Exception):
                            row.owner.on_event({"error": f"{type(e).__name__}: {e}"})
                    self.batch.clear()  # in place: a new cache could fail to allocate as well
                self.stats.running = len(self.batch)
                if self.on_step is not None:
                    with contextlib.suppress(Exception):  # the events' way out is gone: the owner is stopping us
                        self.on_step()

    def _admit(self) -> None:
        """Waiting requests join the batch while it has room; with no row running, wait for one (up to 0.1 s)."""
        while not self.batch.full:
            try:
                r = self.waiting.get_nowait() if self.batch.rows else self.waiting.get(timeout=0.1)
            except queue.Empty:
                return
            with self._lock:
                self.stats.waiting -= 1
            if r.cancelled.is_set() or r.gen.max_new_tokens == 0:  # its client left while it waited; or no budget
                self._finish(r, "cancelled" if r.cancelled.is_set() else "length", 0)
                continue
            row = self.batch.row(r.prompt_ids, r.gen, RowText(self.tokenizer, r.prompt_ids, r.gen.stop), owner=r)
            try:
                self.batch.add(row)
            except Exception as e:
                if row not in self.batch.rows:  # else the batch's failure below tells it
                    r.on_event({"error": f"{type(e).__name__}: {e}"})
                if isinstance(e, ValueError):  # the prompt was refused before anything changed
                    continue
                raise  # out of memory or worse: the batch may be half-changed
            self.stats.prompt_tokens += len(r.prompt_ids)

    def _step(self) -> None:
        now = time.monotonic()
        for i in reversed(range(len(self.batch))):  # clients gone or out of time: their rows end now
            r = self.batch.rows[i].owner
            if r.cancelled.is_set() or (r.deadline is not None and now > r.deadline):
                self._end(i, "cancelled" if r.cancelled.is_set() else "length")
        if not self.batch.rows:
            return
        tokens = self.batch.step()
        self.stats.steps += 1
        ended = []
        for i, (row, token) in enumerate(zip(self.batch.rows, tokens, strict=True)):
            last = token == self.eos_id or row.new_tokens >= row.gen.max_new_tokens
            piece = row.text.take(token, self.eos_id, last)
            if piece:
                row.owner.send_text(piece)
            if row.text.done:
                ended.append((i, "stop" if row.text.stopped or token == self.eos_id else "length"))
        for i, reason in reversed(ended):
            self._end(i, reason)

    def _finish(self, r: Request, reason: str, completion_tokens: int) -> None:
        """Count a finished request and send its finish event."""
        self.stats.completion_tokens += completion_tokens
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        event = {"finish_reason": reason, "completion_tokens": completion_tokens, "prompt_tokens": len(r.prompt_ids)}
        r.on_event(event)

    def _end(self, i: int, reason: str) -> None:
        """Row i's reply ended: what it held back goes out (unless its client left), then its finish event."""
        row = self.batch.rows[i]
        r = row.owner
        rest = "" if row.text.done else row.text.finish()
        if rest and reason != "cancelled":
            r.send_text(rest)
        self._finish(r, reason, row.new_tokens)
        self.batch.remove(i)
