"""The HTTP server: an OpenAI-compatible API over the batching engine, Prometheus metrics, and a chat page.

    GET  /v1/models              the served model
    POST /v1/completions         text completion (stream: server-sent events in OpenAI's chunk format)
    POST /v1/chat/completions    chat, in the checkpoint's chat template (llmmo finetune sft)
    GET  /health                 liveness
    GET  /metrics                Prometheus text format
    GET  /                       the chat page
    GET  /openapi.json           the schema of all of the above

Every error is OpenAI's JSON body ({"error": {"message", "type", "param", "code"}}) with its status: 400
malformed body, unusable input or a feature of OpenAI's API that llmmo lacks (logprobs, tools, ...), 401 bad API
key, 404 unknown model, 413 prompt longer than the context, 422 a field of the wrong type or out of range, 429
queue full, 503 shutting down, 504 nothing generated before the request's timeout. A stream that fails after it
started ends with an error event, then [DONE].
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmmo.checkpoint import Checkpoint
from llmmo.errors import ConfigError, LlmmoError
from llmmo.finetune.chat import END, MARKERS, encode_chat, has_chat_tokens
from llmmo.generate import GenerationConfig
from llmmo.serve import schemas
from llmmo.serve.engine import Engine, EngineStopped, QueueFull
from llmmo.serve.engine import Request as EngineRequest
from llmmo.serve.worker import EngineProcess


@dataclass
class ServeConfig:
    model_name: str  # what clients pass as "model"
    api_key: str | None = None  # when set, requests need "Authorization: Bearer <key>"
    max_batch: int = 8  # requests decoded together
    max_queue: int = 64  # requests waiting; more are refused with 429
    request_timeout_s: float = 120.0  # a request's generation stops after this long (finish_reason "length")
    default_max_tokens: int = 256
    threads: int = 0  # torch's CPU threads for decoding; 0: all cores but one, which the HTTP side needs
    engine_process: bool = False  # decode in a process of its own (llmmo.serve.worker); needs checkpoint_path
    checkpoint_path: str | None = None  # what that process loads
    device: str = "cpu"


ENGINE_GRACE_S = 30.0  # past a request's deadline, how long its answer may still take before it is given up


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.body = (
            status,
            schemas.ErrorBody(error=schemas.ErrorDetail(message=message, type=kind, param=param, code=code)),
        )


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.ErrorBody, "description": text}
    for status, text in {
        400: "Malformed body, unusable input, or a feature this server does not implement",
        401: "Missing or wrong API key",
        404: "Unknown model",
        413: "Prompt longer than the model's context",
        422: "A field of the wrong type or out of range",
        429: "Too many requests waiting",
        503: "The server is shutting down",
        504: "Nothing generated before the request's timeout",
    }.items()
}
SSE = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
            "required": ["data"],
        }
    }
}


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body.model_dump(), status_code=error.status)


class Metrics:
    """Prometheus series of one server (its own registry, so that several apps in one process do not clash)."""

    def __init__(self, engine: Engine | EngineProcess):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("llmmo_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.latency = Histogram(
            "llmmo_request_latency_seconds",
            "Request latency (to the last byte)",
            ["path"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.first_token = Histogram(
            "llmmo_time_to_first_token_seconds",
            "From arrival to the first text",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.prompt_tokens = Counter("llmmo_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("llmmo_completion_tokens", "Tokens generated", registry=r)
        Gauge("llmmo_queue_depth", "Requests waiting", registry=r).set_function(lambda: engine.stats.waiting)
        finished = Gauge("llmmo_finished_requests", "Generations ended, by why", ["reason"], registry=r)
        for reason in ("stop", "length", "cancelled"):
            finished.labels(reason).set_function(lambda reason=reason: engine.stats.finished.get(reason, 0))
        Gauge("llmmo_running_requests", "Requests being decoded", registry=r).set_function(lambda: engine.stats.running)
        steps = Gauge("llmmo_decode_steps", "Decoding steps (tokens generated / steps: the mean batch)", registry=r)
        steps.set_function(lambda: engine.stats.steps)


def create_app(ckpt: Checkpoint, cfg: ServeConfig) -> FastAPI:
    """The FastAPI app serving `ckpt`; its engine runs while the app does (lifespan). With `engine_process` the
    engine loads the checkpoint again in its own process, and the app keeps only the tokenizer of `ckpt`."""
    tokenizer, block = ckpt.tokenizer, ckpt.model.cfg.block_size
    chat = has_chat_tokens(tokenizer)
    if cfg.engine_process:
        if cfg.checkpoint_path is None:
            raise ValueError("an engine process loads the checkpoint from checkpoint_path; set it")
        engine = EngineProcess(cfg.checkpoint_path, cfg.device, cfg.max_batch, cfg.max_queue, cfg.threads)
    else:
        engine = Engine(ckpt.model, tokenizer, tokenizer.text_end_id, cfg.max_batch, cfg.max_queue, cfg.threads)
    metrics = Metrics(engine)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(engine.start)  # an engine process loads the checkpoint first: not on the loop
        yield
        await asyncio.to_thread(engine.stop)  # waits for the step in progress

    app = FastAPI(
        title="llmmo", version="1", lifespan=lifespan, description="An OpenAI-compatible API for an llmmo checkpoint."
    )

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"msg": "invalid request", "loc": ()}
        if first.get("type") == "json_invalid":
            return _error_response(APIError(400, f"the body is not valid JSON: {first.get('msg')}"))
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        # a feature this server lacks is not a value out of range: 400, as OpenAI answers one it does not offer
        status = 400 if first.get("type") == schemas.UNSUPPORTED else 422
        return _error_response(APIError(status, f"{param or 'body'}: {first.get('msg')}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        response = _error_response(APIError(e.status_code, str(e.detail), kind="invalid_request_error"))
        response.headers.update(e.headers or {})  # 405's Allow header (RFC 9110)
        return response

    app.add_middleware(MeasureRequests, metrics=metrics)

    def authorize(request: Request) -> None:
        if cfg.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {cfg.api_key}":
            raise APIError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                "authentication_error",
                code="invalid_api_key",
            )

    def check_model(name: str) -> None:
        if name != cfg.model_name:
            raise APIError(
                404,
                f"model '{name}' does not exist; this server serves '{cfg.model_name}'",
                param="model",
                code="model_not_found",
            )

    def generation(
        body: schemas.Sampling, max_tokens: int | None, extra_stop: tuple[str, ...] = ()
    ) -> GenerationConfig:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > schemas.MAX_STOP or any(not s for s in stop):
            raise APIError(422, f"stop: at most {schemas.MAX_STOP} non-empty strings", param="stop")
        max_tokens = max_tokens or min(cfg.default_max_tokens, block)
        if max_tokens > block:
            raise APIError(422, f"max_tokens: at most {block} (the model's context)", param="max_tokens")
        return GenerationConfig(
            max_new_tokens=max_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            seed=body.seed,
            stop=(*stop, *extra_stop),
        )

    def prompt_ids(encode, text_for_error: str) -> list[int]:
        try:
            ids = encode()
        except LlmmoError as e:
            raise APIError(400, str(e), param=text_for_error) from None
        except Exception as e:  # the tokenizer refusing some input is the input's problem, not the server's
            raise APIError(
                400, f"the text cannot be tokenized ({type(e).__name__}: {e})", param=text_for_error
            ) from None
        if not ids:
            if tokenizer.eot_id is None:
                raise APIError(
                    400,
                    "the prompt is empty and this tokenizer has no end-of-text token to start from",
                    param=text_for_error,
                )
            ids = [tokenizer.eot_id]
        if len(ids) >= block:
            raise APIError(
                413,
                f"the prompt has {len(ids)} tokens; the model's context holds {block}, including the reply: shorten it",
                param=text_for_error,
                code="context_length_exceeded",
            )
        return ids

    async def run(ids: list[int], gen: GenerationConfig, stream: bool) -> tuple[EngineRequest, asyncio.Queue, list]:
        """Submit a generation. Its events come through the queue; the text of a reply sent whole gathers in the
        list instead, so that its tokens do not wake the event loop one by one."""
        loop, events, pieces = asyncio.get_running_loop(), asyncio.Queue(), []

        def on_event(event: dict) -> None:  # called by the engine's thread
            if "text" in event and not stream:
                pieces.append(event["text"])
            else:
                loop.call_soon_threadsafe(events.put_nowait, event)

        request = EngineRequest(ids, gen, on_event, deadline=time.monotonic() + cfg.request_timeout_s)
        try:
            engine.submit(request)
        except QueueFull as e:
            raise APIError(
                429, f"the server is busy ({e}); retry later", "rate_limit_error", code="queue_full"
            ) from None
        except EngineStopped as e:
            raise APIError(503, str(e), "server_error") from None
        return request, events, pieces

    async def events_of(request: EngineRequest, events: asyncio.Queue) -> AsyncIterator[dict]:
        """The engine's events for one request; a client that goes away cancels it (its row ends)."""
        try:
            while True:
                # a backstop: the engine ends every row by its deadline; one that stops answering fails the wait
                wait = None if request.deadline is None else request.deadline - time.monotonic() + ENGINE_GRACE_S
                try:
                    async with asyncio.timeout(wait):
                        event = await events.get()
                except TimeoutError:
                    raise APIError(503, "the engine stopped answering; restart the server", "server_error") from None
                if "error" in event:
                    raise APIError(503, f"generation failed: {event['error']}", "server_error")
                yield event
                if "finish_reason" in event:
                    if request.first_text is not None:
                        metrics.first_token.observe(request.first_text - request.submitted)
                    metrics.prompt_tokens.inc(event["prompt_tokens"])
                    metrics.completion_tokens.inc(event["completion_tokens"])
                    return
        finally:
            request.cancel()  # no-op once finished; frees the row when the client has gone

    def usage(done: dict) -> schemas.Usage:
        p, c = done["prompt_tokens"], done["completion_tokens"]
        return schemas.Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

    async def collect(request: EngineRequest, events: asyncio.Queue, pieces: list, http: Request) -> tuple[str, dict]:
        done = {}
        waiter = asyncio.ensure_future(_cancel_when_gone(http, request))
        try:
            async for event in events_of(request, events):
                done = event
        finally:
            waiter.cancel()
        if done.get("finish_reason") == "length" and not pieces and done.get("completion_tokens") == 0:
            raise APIError(504, "nothing was generated before the request's timeout", "timeout_error")
        return "".join(pieces), done

    def sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            except APIError as e:  # after the 200 went out: the error is the stream's last event
                yield f"data: {e.body.model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def finish(reason: str) -> str:
        return "stop" if reason == "stop" else "length"

    responses = {**ERRORS, 200: {"content": SSE, "description": "JSON, or server-sent events when stream is true"}}

    @app.get("/v1/models", response_model=schemas.ModelList, responses=ERRORS, dependencies=[Depends(authorize)])
    async def models() -> schemas.ModelList:
        return schemas.ModelList(data=[schemas.ModelCard(id=cfg.model_name, created=created)])

    @app.post(
        "/v1/completions", response_model=schemas.Completion, responses=responses, dependencies=[Depends(authorize)]
    )
    async def completions(body: schemas.CompletionRequest, http: Request):
        check_model(body.model)
        gen = generation(body, body.max_tokens)
        ids = prompt_ids(lambda: tokenizer.encode(body.prompt) if body.prompt else [], "prompt")
        request, events, pieces = await run(ids, gen, body.stream)
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:

            async def chunks() -> AsyncIterator[dict]:
                async for event in events_of(request, events):
                    reason = finish(event["finish_reason"]) if "finish_reason" in event else None
                    yield {
                        "id": rid,
                        "object": "text_completion",
                        "created": now,
                        "model": cfg.model_name,
                        "choices": [
                            {"index": 0, "text": event.get("text", ""), "finish_reason": reason, "logprobs": None}
                        ],
                    }

            return sse(chunks())
        text, done = await collect(request, events, pieces, http)
        choice = schemas.CompletionChoice(index=0, text=text, finish_reason=finish(done["finish_reason"]))
        return schemas.Completion(id=rid, created=now, model=cfg.model_name, choices=[choice], usage=usage(done))

    @app.post(
        "/v1/chat/completions",
        response_model=schemas.ChatCompletion,
        responses=responses,
        dependencies=[Depends(authorize)],
    )
    async def chat_completions(body: schemas.ChatRequest, http: Request):
        check_model(body.model)
        if not chat:
            raise APIError(
                400,
                f"'{cfg.model_name}' was not instruction-tuned (its tokenizer has no chat template); "
                "use /v1/completions, or serve a checkpoint from `llmmo finetune sft`",
            )
        gen = generation(body, body.max_completion_tokens or body.max_tokens, (*MARKERS.values(), END))
        messages = [m.model_dump() for m in body.messages]
        ids = prompt_ids(lambda: encode_chat(tokenizer, messages, add_generation_prompt=True)[0], "messages")
        request, events, pieces = await run(ids, gen, body.stream)
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:

            async def chunks() -> AsyncIterator[dict]:
                head = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": cfg.model_name}
                yield head | {
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
                }
                async for event in events_of(request, events):
                    if "finish_reason" in event:
                        yield head | {
                            "choices": [{"index": 0, "delta": {}, "finish_reason": finish(event["finish_reason"])}]
                        }
                    elif event.get("text"):
                        yield head | {
                            "choices": [{"index": 0, "delta": {"content": event["text"]}, "finish_reason": None}]
                        }

            return sse(chunks())
        text, done = await collect(request, events, pieces, http)
        choice = schemas.ChatChoice(
            index=0, message=schemas.ReplyMessage(content=text), finish_reason=finish(done["finish_reason"])
        )
        return schemas.ChatCompletion(id=rid, created=now, model=cfg.model_name, choices=[choice], usage=usage(done))

    @app.get("/health", responses={503: {"model": schemas.ErrorBody, "description": "The engine has stopped"}})
    async def health() -> dict[str, str]:
        if not engine.alive:
            raise APIError(503, "the engine has stopped; restart the server", "server_error")
        return {"status": "ok", "model": cfg.model_name}

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get(
        "/", response_class=HTMLResponse, responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}}}
    )
    async def page() -> HTMLResponse:
        html = resources.files("llmmo.serve").joinpath("chat.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{MODEL}}", cfg.model_name))

    app.state.engine, app.state.metrics = engine, metrics
    return app


class MeasureRequests:
    """Counts requests by route and status and times them to their last byte (streams included), as plain ASGI
    middleware: Starlette's @app.middleware("http") would hide a client's disconnect from the handlers."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), ["500"]

        async def timed_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                route = scope.get("route")
                path = route.path if route is not None else "other"
                self.metrics.requests.labels(path, status[0]).inc()
                self.metrics.latency.labels(path).observe(time.perf_counter() - start)

        await self.app(scope, receive, timed_send)


async def _cancel_when_gone(http: Request, request: EngineRequest) -> None:
    """Poll for the client's disconnect while a non-streamed request is decoded; cancel its row if it left."""
    while not request.cancelled.is_set():
        if await http.is_disconnected():
            request.cancel()
            return
        await asyncio.sleep(0.25)


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the checkpoint loads: a port in use is then an llmmo error at once, where
    uvicorn would load everything first and exit 3 with a message of its own. `serve` hands it to uvicorn, so no
    other program can take the port in between."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)  # the family uvicorn would pick
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart need not wait TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as e:  # an unknown --host too (socket.gaierror)
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is already in use (another server?); choose another --port "
                "(--port 0 takes any free one)"
            ) from None
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --host or --port") from None
    return sock


def serve(app: FastAPI, sock: socket.socket) -> None:
    """Run `app` on the socket of `listen` until Ctrl-C or SIGTERM (what uvicorn.run does for a host and port);
    the caller closes the socket."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # re-raised by uvicorn after its graceful shutdown; nothing is left to do
        pass
