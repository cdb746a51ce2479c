"""Continuous batching (llmmo.serve.batch and the engine): a row that joins and leaves a running batch gets what
its prompt gets alone, through shifts of the shared cache, rows moving, and the context window's refills."""

from __future__ import annotations

import threading

import pytest
import torch

from llmmo.checkpoint import save_checkpoint
from llmmo.config import DataConfig
from llmmo.generate import GenerationConfig, RowText, generate
from llmmo.serve.batch import RunningBatch
from llmmo.serve.engine import Engine, EngineStopped, QueueFull, Request
from llmmo.serve.worker import EngineProcess
from test_generate import CHAR, FAMILIES, greedy, reference_greedy, tiny, train


def run_schedule(model, arrivals: list[tuple[int, str, GenerationConfig]], max_batch: int) -> dict[int, list[int]]:
    """Decode `arrivals` (step, prompt, settings) in one running batch: each joins at its step (or when a row is
    free), leaves when its budget is spent. Returns each arrival's new tokens, by its index."""
    batch = RunningBatch(model, CHAR.vocab_size, max_batch)
    waiting, done, step = list(enumerate(arrivals)), {}, 0
    while waiting or batch.rows:
        while waiting and waiting[0][1][0] <= step and not batch.full:
            key, (_, prompt, gen) = waiting.pop(0)
            ids = CHAR.encode(prompt)
            batch.add(batch.row(ids, gen, RowText(CHAR, ids, ()), owner=key))
        if batch.rows:
            batch.step()
            for i in reversed(range(len(batch))):
                row = batch.rows[i]
                if row.new_tokens >= row.gen.max_new_tokens:
                    done[row.owner] = row.tokens[len(row.prompt_ids) :]
                    batch.remove(i)
        step += 1
    return done


@pytest.mark.parametrize("family, n_kv_head", FAMILIES)
def test_rows_joining_and_leaving_get_what_their_prompt_gets_alone(family, n_kv_head):
    model = tiny(family, n_kv_head).eval()  # block_size 32
    block = model.cfg.block_size
    arrivals = [
        (0, "the", greedy(max_new_tokens=5)),  # leaves early: the last row moves into its place
        (0, "hello world", greedy(max_new_tokens=70)),  # past the context twice: refills from half a block
        (2, "the quick brown fox jumps", greedy(max_new_tokens=20)),  # longer than pos: every row moves right
        (3, "h", greedy(max_new_tokens=9)),  # waits for a free row (max_batch 3); one token: nothing to prefill
        (4, "lazy dog", greedy(max_new_tokens=40)),  # waits too
        (60, "0123", greedy(max_new_tokens=12)),  # joins a batch whose cache has moved left
    ]
    done = run_schedule(model, arrivals, max_batch=3)
    for key, (_, prompt, gen) in enumerate(arrivals):
        expected = reference_greedy(model, CHAR.encode(prompt), gen.max_new_tokens, refill=block // 2)
        assert done[key] == expected, f"arrival {key} ({prompt!r})"


def test_seeded_and_penalized_rows_get_what_they_get_alone():
    model = tiny("llama", 2).eval()
    arrivals = [
        (0, "hello", GenerationConfig(max_new_tokens=25, seed=3, top_k=5)),
        (0, "the", greedy(max_new_tokens=6)),
        (1, "lazy", greedy(max_new_tokens=20, repetition_penalty=1.5)),
        (2, "fox", GenerationConfig(max_new_tokens=15, temperature=0.8)),  # unseeded: the global stream
    ]
    done = run_schedule(model, arrivals, max_batch=4)
    for key in (0, 2):
        _, prompt, gen = arrivals[key]
        assert CHAR.decode(done[key]) == generate(model, CHAR, [prompt], gen)[0]
    assert run_schedule(model, arrivals, max_batch=4)[0] == done[0]  # a seed gives the same text again


def test_a_prompt_that_does_not_fit_is_refused_and_the_batch_goes_on():
    model = tiny().eval()
    batch = RunningBatch(model, CHAR.vocab_size, max_batch=1)
    ids = CHAR.encode("x" * 32)  # block_size 32 leaves no room for a reply
    with pytest.raises(ValueError, match="between 1 and 31"):
        batch.add(batch.row(ids, greedy(), RowText(CHAR, ids, ())))
    ok = CHAR.encode("the")
    batch.add(batch.row(ok, greedy(), RowText(CHAR, ok, ())))
    with pytest.raises(ValueError, match="holds 1 rows"):
        batch.add(batch.row(ok, greedy(), RowText(CHAR, ok, ())))
    assert len(batch) == 1 and batch.step()


# ----------------------------------------------------------------------------------------------------------
# The engine: a worker thread, requests' events


class Events:
    """A request's events, and a flag when it has finished."""

    def __init__(self):
        self.events: list[dict] = []
        self.ended = threading.Event()

    def __call__(self, event: dict) -> None:
        self.events.append(event)
        if "finish_reason" in event or "error" in event:
            self.ended.set()

    @property
    def text(self) -> str:
        return "".join(e.get("text", "") for e in self.events)

    @property
    def last(self) -> dict:
        assert self.ended.wait(30), "the request never finished"
        return self.events[-1]


@pytest.fixture(scope="module")
def hello_engine():
    model = train(tiny(), CHAR.encode("hello world! " * 40))
    engine = Engine(model, CHAR, eos_id=None, max_batch=2, max_queue=4)
    threads = torch.get_num_threads()
    engine.start()  # sets torch's threads for the process
    yield engine, model
    engine.stop()
    torch.set_num_threads(threads)


def test_the_engine_ends_rows_at_stops_budgets_and_cancels(hello_engine):
    engine, model = hello_engine
    cases = {
        "stop": greedy(max_new_tokens=40, stop=("w",)),
        "length": greedy(max_new_tokens=9),
        "nothing": greedy(max_new_tokens=0),
        "cancelled": greedy(max_new_tokens=10_000),
    }
    sinks = {name: Events() for name in cases}
    requests = {name: Request(CHAR.encode("hello"), gen, sinks[name]) for name, gen in cases.items()}
    for r in requests.values():  # four requests, two rows: two wait, then join as rows leave
        engine.submit(r)
    for name in ("stop", "length"):
        assert "finish_reason" in sinks[name].last
        assert sinks[name].text == generate(model, CHAR, ["hello"], cases[name])[0]
    assert sinks["stop"].last["finish_reason"] == "stop" and "w" not in sinks["stop"].text
    assert sinks["length"].last == {"finish_reason": "length", "completion_tokens": 9, "prompt_tokens": 5}
    assert sinks["nothing"].last["completion_tokens"] == 0 and sinks["nothing"].text == ""
    requests["cancelled"].cancel()
    assert sinks["cancelled"].last["finish_reason"] == "cancelled"
    assert sinks["cancelled"].last["completion_tokens"] < 10_000


def test_a_full_queue_refuses_and_a_deadline_ends_a_reply(hello_engine):
    engine, _ = hello_engine
    sinks = [Events() for _ in range(2 + 4)]  # both rows busy, then the queue full
    requests = [Request(CHAR.encode("hello"), greedy(max_new_tokens=10_000), sink) for sink in sinks]
    for r in requests[:2]:
        engine.submit(r)
    for _ in range(3000):  # until both rows run
        if engine.stats.running == 2:
            break
        threading.Event().wait(0.01)
    for r in requests[2:]:
        engine.submit(r)
    with pytest.raises(QueueFull):
        engine.submit(Request(CHAR.encode("hello"), greedy(), Events()))
    for r in requests:
        r.deadline = 0.0  # long past: each row ends at the next step, with what it has
    assert all(sink.last["finish_reason"] == "length" for sink in sinks)
    assert 0 < sinks[0].last["completion_tokens"] < 10_000  # ran until its deadline


def test_a_failed_step_or_join_fails_the_batch_once_and_the_engine_goes_on(hello_engine, monkeypatch):
    engine, model = hello_engine
    for broken in ("step", "_prefill"):  # a decoding step, then a join, runs out of memory (say)
        sinks = [Events(), Events()]
        requests = [Request(CHAR.encode("hello"), greedy(max_new_tokens=10_000), sink) for sink in sinks]
        engine.submit(requests[0])
        for _ in range(3000):  # until it runs
            if sinks[0].text:
                break
            threading.Event().wait(0.01)
        with monkeypatch.context() as patch:
            patch.setattr(engine.batch, broken, lambda *a: (_ for _ in ()).throw(RuntimeError("out of memory")))
            engine.submit(requests[1])
            assert all("out of memory" in sink.last["error"] for sink in sinks)
        assert all(sum("error" in e or "finish_reason" in e for e in sink.events) == 1 for sink in sinks)
        after = Events()
        engine.submit(Request(CHAR.encode("hello"), greedy(max_new_tokens=9), after))
        assert after.last["finish_reason"] == "length"
        assert after.text == generate(model, CHAR, ["hello"], greedy(max_new_tokens=9))[0]


# ----------------------------------------------------------------------------------------------------------
# The engine in a process of its own


def test_an_engine_process_decodes_cancels_and_fails_requests_when_it_dies(tmp_path):
    model = train(tiny(), CHAR.encode("hello world! " * 40))
    save_checkpoint(tmp_path / "ckpt", model, CHAR, DataConfig(tokenizer="char", block_size=32))
    engine = EngineProcess(str(tmp_path / "ckpt"), "cpu", max_batch=2, max_queue=1)
    engine.start()
    try:
        gens = [greedy(max_new_tokens=20), greedy(max_new_tokens=10_000)]
        sinks = [Events(), Events()]
        requests = [Request(CHAR.encode("hello"), g, s) for g, s in zip(gens, sinks, strict=True)]
        for r in requests:
            engine.submit(r)
        assert sinks[0].last["finish_reason"] == "length"
        assert sinks[0].text == generate(model, CHAR, ["hello"], gens[0])[0]  # the child loaded the same model
        for sink in (Events(), waiting := Events()):  # takes the free row; waits
            engine.submit(Request(CHAR.encode("the"), greedy(max_new_tokens=10_000), sink))
        with pytest.raises(QueueFull):  # 2 rows + 1 waiting
            engine.submit(Request(CHAR.encode("the"), greedy(), Events()))
        requests[1].cancel()  # crosses to the child: its row ends, the waiting request takes it
        assert sinks[1].last["finish_reason"] == "cancelled"
        for _ in range(3000):
            if waiting.text:
                break
            threading.Event().wait(0.01)
        assert waiting.text and engine.stats.finished == {"length": 1, "cancelled": 1}
        assert engine.alive
        engine._process.kill()  # the engine dies mid-reply: its requests get an error, new ones are refused
        assert "engine process stopped" in waiting.last["error"]
        assert not engine.alive
        with pytest.raises(EngineStopped):
            engine.submit(Request(CHAR.encode("the"), greedy(), Events()))
    finally:
        engine.stop()
