"""The engine in a process of its own, so that decoding and the HTTP side do not take turns on one lock.

In one process, the event loop (parsing, validating and answering requests) and the engine's thread (the Python
part of every decoding step) share the interpreter lock: each waits for the other, and on 2 cores the server
used about one core in all (docs/LOG.md). As vLLM's V1 does with its engine core, the engine runs in a child
process started with `spawn`, which loads the checkpoint itself. The two talk through two pipes: commands go
down (submit, cancel, stop); after a round of the engine's loop that produced events or changed its counters,
one message comes up with both. Only token ids, settings and text cross, between two processes of this
program (multiprocessing pickles them; nothing is read from a file that way).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import multiprocessing as mp
import signal
import sys
import threading
import time
from dataclasses import asdict
from multiprocessing.connection import Connection

from llmmo.serve.engine import Engine, EngineStats, EngineStopped, QueueFull, Request


class EngineProcess:
    """An `Engine` in a child process, with the interface the app uses: start, stop, submit, stats."""

    def __init__(self, checkpoint: str, device: str, max_batch: int = 8, max_queue: int = 64, threads: int = 0):
        self.max_batch, self.max_queue = max_batch, max_queue
        self.stats = EngineStats()  # the engine's counters, as of its last message
        self.pending: dict[int, Request] = {}  # submitted and not finished, by id
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards `pending`, `_gone` and the command pipe
        self._gone: str | None = None  # why the engine process is no more
        ctx = mp.get_context("spawn")  # a fresh interpreter: forking a process that runs threads is unsafe
        child_commands, self._commands = ctx.Pipe(duplex=False)
        self._events, child_events = ctx.Pipe(duplex=False)
        self._child_ends = (child_commands, child_events)
        self._process = ctx.Process(
            target=serve_engine,
            args=(child_commands, child_events, checkpoint, device, max_batch, threads),
            name="llmmo-engine",
            daemon=True,
        )
        self._reader = threading.Thread(target=self._read, name="llmmo-engine-events", daemon=True)

    def start(self) -> None:
        """Start the process; return once it has loaded the checkpoint (raise if it could not)."""
        self._process.start()
        for end in self._child_ends:  # the child's copies: its end reads as end-of-file here when it dies
            end.close()
        try:
            kind, detail = self._events.recv()
        except EOFError:
            self._process.join(timeout=5)
            raise RuntimeError(  # the child's own error is on stderr
                f"the engine process ended while starting (exit code {self._process.exitcode})"
            ) from None
        if kind != "ready":
            raise RuntimeError(f"the engine process could not start: {detail}")
        self._reader.start()

    def stop(self) -> None:
        """Stop the engine process after its step in progress; requests not finished get an error."""
        if self._process.pid is None:  # never started
            return
        self._command(("stop",))
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=5)
        if self._reader.is_alive():
            self._reader.join(timeout=5)

    @property
    def alive(self) -> bool:
        return self._gone is None and self._process.is_alive()

    def submit(self, request: Request) -> None:
        with self._lock:
            if self._gone is not None:
                raise EngineStopped(self._gone)
            if len(self.pending) >= self.max_batch + self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are waiting already")
            rid = next(self._ids)
            timeout = None if request.deadline is None else request.deadline - time.monotonic()
            try:
                self._commands.send(("submit", rid, request.prompt_ids, request.gen, timeout))
            except OSError:  # the process died and the reader has not noticed yet
                raise EngineStopped("the engine process stopped; restart the server") from None
            self.pending[rid] = request
            request.on_cancel = functools.partial(self._command, ("cancel", rid))

    def _command(self, message: tuple) -> None:
        with self._lock:
            if self._gone is None:
                try:
                    self._commands.send(message)
                except OSError:  # the process is gone; the reader reports it
                    pass

    def _read(self) -> None:
        """Hand each event to its request, and keep the counters; when the process ends, fail what is left."""
        try:
            while True:
                try:
                    events, stats = self._events.recv()
                except (EOFError, OSError):
                    break
                self.stats = EngineStats(**stats)
                for rid, event in events:
                    ended = "finish_reason" in event or "error" in event
                    with self._lock:
                        request = self.pending.pop(rid, None) if ended else self.pending.get(rid)
                    if request is None:
                        continue
                    if ended:
                        request.on_cancel = None  # nothing left to cancel over there
                    with contextlib.suppress(Exception):  # one request's closed loop must not stop the others'
                        if "text" in event:
                            request.send_text(event["text"])
                        else:
                            request.on_event(event)
        finally:
            with self._lock:
                self._gone = "the engine process stopped; restart the server"
                left, self.pending = list(self.pending.values()), {}
            for request in left:
                with contextlib.suppress(Exception):
                    request.on_event({"error": self._gone})


def serve_engine(
    commands: Connection, events: Connection, checkpoint: str, device: str, max_batch: int, threads: int
) -> None:
    """The engine process: load the checkpoint, say ready, then take commands until told to stop (or until the
    server is gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the server stops us
    try:
        from llmmo.checkpoint import load_checkpoint

        ckpt = load_checkpoint(checkpoint, device=device)
    except Exception as e:
        events.send(("failed", f"{type(e).__name__}: {e}"))
        return
    outbox: list[tuple[int, dict]] = []  # this round's events: the worker thread's, or stop()'s after it ended
    requests: dict[int, Request] = {}

    def post(rid: int, event: dict) -> None:
        outbox.append((rid, event))
        if "finish_reason" in event or "error" in event:
            requests.pop(rid, None)

    sent: list[dict] = [{}]  # the counters last sent

    def flush() -> None:
        stats = asdict(engine.stats)
        if outbox or stats != sent[0]:
            round_events = outbox[:]
            del outbox[:]
            events.send((round_events, stats))
            sent[0] = stats

    tokenizer = ckpt.tokenizer
    # the server bounds the queue (it knows what it has sent); here every request it sends is taken
    engine = Engine(ckpt.model, tokenizer, tokenizer.text_end_id, max_batch, sys.maxsize, threads, on_step=flush)
    events.send(("ready", None))
    engine.start()
    try:
        while True:
            try:
                message = commands.recv()
            except EOFError:
                break
            if message[0] == "submit":
                _, rid, prompt_ids, gen, timeout = message
                deadline = None if timeout is None else time.monotonic() + timeout
                requests[rid] = request = Request(prompt_ids, gen, functools.partial(post, rid), deadline)
                engine.submit(request)
            elif message[0] == "cancel" and (request := requests.get(message[1])) is not None:
                request.cancel()
            elif message[0] == "stop":
                break
    finally:
        engine.stop()
        with contextlib.suppress(OSError):  # the server may be gone already
            flush()
