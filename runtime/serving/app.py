"""The HTTP side of ``runtime serve``: FastAPI routes over one EngineLoop, errors in OpenAI's shape.

Handlers parse and validate, submit, then only read their request's event queue: a non-streaming
request waits for all its choices, a streaming one forwards each event as an SSE chunk. A client that
goes away (its connection closes) has its request aborted; the engine loop frees the blocks at its next
step. Anything a client sends that the server refuses is a 4xx with an OpenAI error object; a fault of
the server itself is a 500 with no traceback in the body (the traceback goes to the log).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from runtime.engine import Engine
from runtime.serving.engine_loop import EngineLoop, ErrorEvent, Handle, PromptEvent
from runtime.serving.metrics import Metrics
from runtime.serving.protocol import ApiError, Generation, parse_chat, parse_completion
from runtime.serving.responses import Collector, TokenNames, chat_logprobs, completion_logprobs, prompt_entries

log = logging.getLogger("trilite.serve")


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


class _RequestLog:
    """ASGI middleware: one log line per request (method, path, status, tokens, seconds) and requests by status."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            state = scope.get("state", {})
            tokens = f" prompt_tokens={state['usage'][0]} completion_tokens={state['usage'][1]}" \
                if "usage" in state else ""
            note = " aborted: client gone" if state.get("aborted") else ""
            log.info("%s %s %d%s %.3fs%s", scope["method"], scope["path"], status[0], tokens,
                     time.perf_counter() - start, note)
            if scope["path"].startswith("/v1/"):
                self.metrics.requests.labels(str(status[0])).inc()


class _EventStream(StreamingResponse):
    """An SSE response that calls ``on_close`` however it ends, even when the client is gone before the body's
    generator first runs (its own ``finally`` would then never run, and the request would go on to its end)."""

    def __init__(self, events: AsyncIterator[str], on_close) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed its connection (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_queue: int = 256) -> FastAPI:
    metrics = Metrics()
    loop = EngineLoop(engine, metrics, max_queue)
    metrics.bind(requests_running=lambda: loop.num_running, requests_waiting=lambda: loop.num_waiting,
                 kv_blocks_in_use=lambda: engine.allocator.num_used,
                 kv_blocks_total=lambda: engine.allocator.num_blocks,
                 max_batch_size_seen=lambda: loop.max_batch_seen,
                 prefix_cache_hit_tokens=lambda: engine.scheduler.reused_tokens)
    names = TokenNames(engine.tokenizer)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        loop.start()
        yield
        loop.stop()

    app = FastAPI(title="trilite", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_RequestLog, metrics=metrics)
    app.state.loop = loop

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(ApiError(400, str(e)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(_request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        body = ApiError(500, f"internal server error ({type(e).__name__})", kind="server_error").body()
        return JSONResponse(body, status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def read_json(request: Request):
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    def check_model(gen: Generation) -> None:
        if gen.model is not None and gen.model != model_name:
            raise ApiError(404, f"the model '{gen.model}' does not exist: this server serves '{model_name}'",
                           param="model", code="model_not_found")

    async def generate(request: Request, gen: Generation):
        check_model(gen)
        handle = loop.submit(gen)
        collector = Collector(gen, model_name)
        if gen.stream:
            return _EventStream(stream(request, handle, collector), lambda: finish(request, handle, collector))
        gone = asyncio.create_task(_disconnected(request))
        try:
            while not collector.done:
                get = asyncio.create_task(handle.events.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    return Response(status_code=499)  # nobody reads it; the log line says what happened
                collector.add(check_event(get.result()))
        finally:
            gone.cancel()
            finish(request, handle, collector)
        return JSONResponse(collector.response(names))

    def check_event(event):
        if isinstance(event, ErrorEvent):
            raise RuntimeError(event.message)
        return event

    def finish(request: Request, handle: Handle, collector: Collector) -> None:
        """Book-keeping at the end of a request, however it ended; the first call counts, later ones do nothing."""
        if collector.closed:
            return
        collector.closed = True
        u = collector.usage()
        request.state.usage = (u["prompt_tokens"], u["completion_tokens"])
        metrics.prompt_tokens.inc(u["prompt_tokens"])
        metrics.generation_tokens.inc(u["completion_tokens"])
        if not collector.done:
            loop.abort(handle)
            metrics.aborted.inc()
            request.state.aborted = True

    async def stream(request: Request, handle: Handle, collector: Collector) -> AsyncIterator[str]:
        gen = collector.gen
        try:
            if gen.kind == "chat":
                yield _sse(collector.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}
                                            for i in range(gen.num_choices)]))
            elif gen.echo and gen.logprobs is None:
                yield _sse(collector.chunk([{"index": i, "text": collector.echo_text(i), "logprobs": None,
                                             "finish_reason": None} for i in range(gen.num_choices)]))
            while not collector.done:
                event = await handle.events.get()
                if isinstance(event, ErrorEvent):
                    yield _sse(ApiError(500, event.message, kind="server_error").body())
                    return
                # a token whose text is held back (half a character, maybe a stop string) has nothing to show
                shown = isinstance(event, PromptEvent) or event.text or event.finish_reason
                if not (shown or gen.logprobs is not None):
                    collector.add(event)
                    continue
                yield _sse(collector.chunk(stream_choices(collector, event)))
                collector.add(event)
            if gen.include_usage:
                yield _sse(collector.chunk([], with_usage=True))
            yield _sse("[DONE]")
        finally:
            finish(request, handle, collector)

    def stream_choices(collector: Collector, event) -> list[dict]:
        """The chunk's choices for one event (called before the collector takes it in)."""
        gen = collector.gen
        if isinstance(event, PromptEvent):  # echo with logprobs: the prompt's text and scores, once per choice
            entries = prompt_entries(gen.prompts[event.index], event.logprobs)
            lp = completion_logprobs(entries, names, 0)
            return [{"index": i, "text": collector.echo_text(i), "logprobs": lp, "finish_reason": None}
                    for i in range(event.index * gen.n, (event.index + 1) * gen.n)]
        i = event.index
        if gen.kind == "chat":
            delta = {"content": event.text} if event.text or event.finish_reason is None else {}
            lp = chat_logprobs(list(event.logprobs), names) if gen.logprobs is not None else None
            return [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": event.finish_reason}]
        offset = len(collector.echo_text(i)) + len(collector.text[i])
        lp = completion_logprobs(list(event.logprobs), names, offset) if gen.logprobs is not None else None
        return [{"index": i, "text": event.text, "logprobs": lp, "finish_reason": event.finish_reason}]

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        return await generate(request, parse_chat(await read_json(request), engine.tokenizer, engine.vocab_size))

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        return await generate(request, parse_completion(await read_json(request), engine.tokenizer,
                                                        engine.vocab_size))

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "trilite", "max_model_len": engine.limits.max_seq_len}]}

    @app.get("/health")
    async def health():
        if not loop.alive:
            return JSONResponse({"status": "engine loop stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_text():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
