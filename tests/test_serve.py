"""`llmmo serve`: a real server process, driven by the official openai client, raw HTTP, schemathesis and a
headless browser."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from llmmo import cli
from llmmo.checkpoint import save_checkpoint
from llmmo.config import DataConfig, ModelConfig, resolve_model
from llmmo.finetune.chat import add_chat_tokens, encode_chat
from llmmo.model import Transformer
from llmmo.tokenizer import Tokenizer, train_tokenizer

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'llmmo[serve]'")
httpx = pytest.importorskip("httpx")
KEY = "secret-key"
TEXT = "Tom has three apples and buys two more. How many apples does he have now? He has five apples. " * 40


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A chat-template checkpoint (random weights: the API, not the answers, is under test), with a context of
    1024 so that a long reply (1000 tokens, over a second) outlives the timeouts and disconnects under test."""
    torch.manual_seed(0)
    tokenizer = train_tokenizer("bpe", [TEXT], 300)
    cfg = ModelConfig(family="llama", n_layer=4, n_head=4, n_embd=256, vocab_size=tokenizer.vocab_size, block_size=1024)
    model = Transformer(resolve_model(cfg))
    tokenizer = add_chat_tokens(model, tokenizer)
    path = tmp_path_factory.mktemp("serve") / "tiny-chat" / "ckpt-best"
    save_checkpoint(path, model, tokenizer, DataConfig(tokenizer="bpe", block_size=1024))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, *extra: str) -> Iterator[str]:
    port = free_port()
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "llmmo", "serve", str(checkpoint), "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            pytest.fail(f"the server exited: {proc.stdout.read()}")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def server(chat_checkpoint: Path) -> Iterator[str]:
    yield from start_server(chat_checkpoint, "--api-key", KEY, "--max-batch", "8")


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def test_the_openai_client_lists_completes_chats_and_streams(server: str) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY)
    assert [m.id for m in client.models.list()] == ["tiny-chat"]
    done = client.completions.create(model="tiny-chat", prompt="Tom has", max_tokens=12, temperature=0)
    assert done.choices[0].finish_reason in ("stop", "length") and done.usage.completion_tokens <= 12
    again = client.completions.create(model="tiny-chat", prompt="Tom has", max_tokens=12, temperature=0)
    assert again.choices[0].text == done.choices[0].text  # greedy is deterministic
    reply = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "How many apples?"}], max_tokens=10, seed=1
    )
    assert reply.choices[0].message.role == "assistant" and reply.usage.prompt_tokens > 0
    chunks = list(
        client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "How many?"}], max_tokens=10, temperature=0,
            stream=True,
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason is not None
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    plain = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "How many?"}], max_tokens=10, temperature=0
    )
    assert streamed == plain.choices[0].message.content  # a stream adds up to the whole reply
    pieces = list(client.completions.create(model="tiny-chat", prompt="Tom", max_tokens=8, temperature=0, stream=True))
    assert (
        "".join(p.choices[0].text for p in pieces)
        == client.completions.create(model="tiny-chat", prompt="Tom", max_tokens=8, temperature=0).choices[0].text
    )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong").models.list()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "max_tokens": "many"}, 422, "max_tokens"),
        ("/v1/completions", {"model": "tiny-chat"}, 422, "prompt"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "max_tokens": 100000}, 422, "max_tokens"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "temperature": 3}, 422, "temperature"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "n": False}, 422, "n"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
        ("/v1/completions", {"model": "other", "prompt": "x"}, 404, "model"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": "apples " * 2000}, 413, "prompt"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "seed": 2**60}, 422, "seed"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": "\ud800"}, 422, "prompt"),
        ("/v1/completions", {"model": "\ud800", "prompt": "x"}, 422, "model"),
        ("/v1/chat/completions", {"model": "tiny-chat", "messages": []}, 422, "messages"),
        ("/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "robot", "content": "x"}]}, 422, None),
        ("/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": "<|end|>"}]}, 400,
         "messages"),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_errors(server: str, path: str, body: dict, status: int, param: str | None) -> None:
    headers = auth() | {"content-type": "application/json"}
    # json.dumps escapes a lone surrogate as \ud800, as a client library would send it
    response = httpx.post(f"{server}{path}", content=json.dumps(body).encode(), headers=headers, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param:
        assert error["param"].startswith(param)


CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "How many?"}], "max_tokens": 2}
COMPLETION = {"model": "tiny-chat", "prompt": "Tom", "max_tokens": 2}


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("/v1/completions", COMPLETION | {"stop": 5}, 422, "stop: must be a string or a list of strings"),
        ("/v1/completions", COMPLETION | {"stop": ["a", 5]}, 422, "stop: must be a string or a list of strings"),
        ("/v1/completions", COMPLETION | {"logprobs": 1}, 400, "logprobs: not supported by this server"),
        ("/v1/completions", COMPLETION | {"echo": True}, 400, "echo: not supported by this server"),
        ("/v1/completions", COMPLETION | {"best_of": 2}, 400, "best_of: not supported by this server"),
        ("/v1/chat/completions", CHAT | {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
         "tools: not supported by this server"),
        ("/v1/chat/completions", CHAT | {"response_format": {"type": "json_object"}}, 400,
         "response_format: not supported by this server"),
        ("/v1/chat/completions", CHAT | {"logprobs": True}, 400, "logprobs: not supported by this server"),
        ("/v1/chat/completions", CHAT | {"top_logprobs": 2}, 400, "top_logprobs: not supported by this server"),
        ("/v1/chat/completions", CHAT | {"tool_choice": "auto"}, 400, "tool_choice: not supported by this server"),
        ("/v1/chat/completions", CHAT | {"function_call": "auto"}, 400, "function_call: not supported"),
        ("/v1/completions", COMPLETION | {"suffix": "end"}, 400, "suffix: not supported by this server"),
        ("/v1/completions", COMPLETION | {"presence_penalty": 0.5}, 400, "presence_penalty: not supported"),
        ("/v1/chat/completions", CHAT | {"frequency_penalty": 1}, 400, "frequency_penalty: not supported"),
        ("/v1/chat/completions", CHAT | {"logit_bias": {"5": 10}}, 400, "logit_bias: not supported by this server"),
        # the values that ask for none of it are fine
        ("/v1/completions", COMPLETION | {"logprobs": None, "echo": False, "best_of": 1}, 200, None),
        ("/v1/chat/completions", CHAT | {"tools": None, "response_format": {"type": "text"}, "logprobs": False,
         "top_logprobs": None, "tool_choice": "none", "presence_penalty": 0, "frequency_penalty": 0.0,
         "logit_bias": {}}, 200, None),
    ],
)  # fmt: skip
def test_mistyped_and_unsupported_fields_are_named(
    server: str, path: str, body: dict, status: int, message: str | None
) -> None:
    response = httpx.post(f"{server}{path}", json=body, headers=auth(), timeout=30)
    assert response.status_code == status, response.text
    if message:
        error = response.json()["error"]
        assert error["message"].startswith(message) and error["param"] == message.split(":")[0]


@pytest.mark.parametrize("port", ["99999", "65536"])
def test_a_port_out_of_range_is_a_usage_error(chat_checkpoint: Path, port: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit:
        cli.main(["serve", str(chat_checkpoint), "--port", port])
    assert exit.value.code == 2
    assert f"argument --port: must be 0-65535 (0: any free port), got {port}" in capsys.readouterr().err


def test_a_port_in_use_is_named(chat_checkpoint: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "llmmo", "serve", str(chat_checkpoint), "--port", str(port)]
        env = os.environ | {"OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"llmmo: error: port {port} on 127.0.0.1 is already in use (another server?); choose another --port "
        "(--port 0 takes any free one)"
    )


def test_malformed_json_and_missing_key(server: str) -> None:
    response = httpx.post(
        f"{server}/v1/completions", content=b"{not json", headers=auth() | {"content-type": "application/json"}
    )
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    response = httpx.post(f"{server}/v1/completions", json={"model": "tiny-chat", "prompt": "x"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/health").json()["status"] == "ok"  # open, like /metrics and the page


def metric(server: str, name: str) -> float:
    text = httpx.get(f"{server}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def wait_for(server: str, name: str, above: float) -> None:
    deadline = time.monotonic() + 20
    while metric(server, name) <= above:
        assert time.monotonic() < deadline, f"{name} stayed at {above}"
        time.sleep(0.05)


def test_a_client_that_leaves_frees_its_slot(server: str) -> None:
    name = 'llmmo_finished_requests{reason="cancelled"}'
    body = {"model": "tiny-chat", "prompt": "Tom", "max_tokens": 1000, "temperature": 0}  # greedy: no early <eot>
    cancelled = metric(server, name)
    with httpx.stream(
        "POST", f"{server}/v1/completions", json=body | {"stream": True}, headers=auth(), timeout=30
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk, then hang up
    wait_for(server, name, cancelled)
    cancelled = metric(server, name)
    with pytest.raises(httpx.ReadTimeout):  # not streamed: the client gives up waiting and closes
        httpx.post(f"{server}/v1/completions", json=body, headers=auth(), timeout=0.5)
    wait_for(server, name, cancelled)
    deadline = time.monotonic() + 20
    while metric(server, "llmmo_running_requests") > 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for name in ("llmmo_requests_total", "llmmo_completion_tokens_total", "llmmo_queue_depth",
                 "llmmo_request_latency_seconds_bucket", "llmmo_time_to_first_token_seconds_bucket"):  # fmt: skip
        assert name in httpx.get(f"{server}/metrics").text


def test_a_full_queue_answers_429_and_a_timeout_ends_the_reply(chat_checkpoint: Path) -> None:
    servers = start_server(chat_checkpoint, "--max-batch", "1", "--max-queue", "1", "--request-timeout", "0.5")
    url = next(servers)
    body = {"model": "tiny-chat", "prompt": "Tom", "max_tokens": 1000, "temperature": 0}  # greedy: no early <eot>
    try:
        httpx.post(f"{url}/v1/completions", json=body | {"max_tokens": 2}, timeout=60)  # warm: the first forward
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: httpx.post(f"{url}/v1/completions", json=body, timeout=60), range(6)))
    finally:
        servers.close()  # stops the server
    statuses = sorted(r.status_code for r in responses)
    # one decodes, one waits (and may time out waiting: 504, nothing generated), the others are refused
    assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429, 504}, statuses
    assert all(r.json()["error"]["type"] == "rate_limit_error" for r in responses if r.status_code == 429)
    for r in responses:
        if r.status_code == 200:  # cut by the 0.5 s timeout, long before 1000 tokens
            assert r.json()["choices"][0]["finish_reason"] == "length"
            assert r.json()["usage"]["completion_tokens"] < 1000


def test_schemathesis_finds_no_server_errors_or_schema_violations(server: str, tmp_path: Path) -> None:
    if shutil.which("schemathesis") is None and not (Path(sys.executable).parent / "schemathesis").exists():
        pytest.skip("schemathesis is not installed (the dev extra has it)")
    exe = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    proc = subprocess.run(
        [exe, "run", f"{server}/openapi.json", "--checks", "all", "--max-examples", "15", "--seed", "1", "-w", "1",
         "--request-timeout", "30", "--header", f"Authorization: Bearer {KEY}", "--max-time", "45"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_the_chat_page_streams_a_reply_in_a_browser(server: str, chat_checkpoint: Path, tmp_path: Path) -> None:
    page_html = httpx.get(f"{server}/").text
    assert "tiny-chat" in page_html and "/v1/chat/completions" in page_html
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is missing: install Debian's chromium package (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=args)
        page = browser.new_page()
        page.goto(f"{server}/")
        page.fill("#key", KEY)
        page.fill("#input", "How many apples?")
        page.click("#send")
        page.wait_for_function("document.querySelector('#reply-1') && document.querySelector('#reply-1').dataset.done")
        first = page.text_content("#reply-1")
        assert first and not first.startswith("error"), first
        assert "tokens/s" in page.text_content("#status")
        page.fill("#input", "And now?")  # the conversation goes on: two user turns, two replies
        page.click("#send")
        page.wait_for_function("document.querySelector('#reply-3') && document.querySelector('#reply-3').dataset.done")
        assert len(page.query_selector_all(".msg.user")) == 2
        # a message that fits the context alone, not with the conversation: the page leaves out old exchanges
        tokenizer = Tokenizer.load(chat_checkpoint / "tokenizer.json")
        words = 1
        while len(encode_chat(tokenizer, [{"role": "user", "content": "apples " * words}], True)[0]) < 1016:
            words += 1
        page.fill("#input", "apples " * words)
        page.click("#send")
        page.wait_for_function("document.querySelector('#reply-5') && document.querySelector('#reply-5').dataset.done")
        assert not page.text_content("#reply-5").startswith("error"), page.text_content("#reply-5")
        assert "earlier messages no longer fit the context)" in page.text_content("#log")
        page.screenshot(path=str(tmp_path / "chat.png"))
        browser.close()
    assert (tmp_path / "chat.png").stat().st_size > 1000
