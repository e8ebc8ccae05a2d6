"""The HTTP side of ``tunesmith deploy``: OpenAI's routes, keys, limits and errors.

Request bodies are read and validated here (not by FastAPI's automatic parsing), so every
failure is OpenAI's error JSON with the right status: 413 before an oversized body is
read in full, 400 for bad JSON or a bad field (naming it), 404 for an unknown model, 401
for a missing or wrong key, 429 with ``Retry-After`` when the queue is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.config import DeployArgs
from tunesmith.serve import protocol as p
from tunesmith.serve.models import Catalog
from tunesmith.serve.scheduler import Job, Sampling, Scheduler


class ApiError(Exception):
    """An error answered as OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def error_response(e: ApiError) -> JSONResponse:
    """The JSON response for ``e``."""
    body = p.error_body(e.status, e.message, e.param, e.code)
    return JSONResponse(body, status_code=e.status, headers=e.headers)


@dataclass
class Server:
    """What the routes share."""

    args: DeployArgs
    """The deploy flags (limits)."""
    api_key: str | None
    """The bearer key every /v1 route needs, or None."""
    scheduler: Scheduler
    """The batching loop."""
    tokenizer: Any
    """The model's tokenizer (chat template)."""
    catalog: Catalog
    """Served model names."""
    defaults: dict[str, Any]
    """Sampling values for fields a request leaves out."""
    in_flight: int = 0
    """Accepted requests not yet answered (decoding or waiting)."""


def create_app(server: Server) -> FastAPI:
    """The FastAPI application of ``server``."""
    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(ApiError(e.status_code, str(e.detail)))

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Response:
        # Checked before the body is read: an unauthenticated client costs nothing.
        if server.api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(
                token.strip().encode(), server.api_key.encode()
            )
            if not ok:
                msg = "missing or wrong API key: send 'Authorization: Bearer YOUR_KEY'"
                return error_response(ApiError(401, msg, code="invalid_api_key"))
        return await call_next(request)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("tunesmith.serve").joinpath("static/index.html")
        return HTMLResponse(html.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        s = server.scheduler
        return {"status": "ok", "running": s.running(), "waiting": len(s.waiting),
                "in_flight": server.in_flight, "generated_tokens": s.generated}  # fmt: skip

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        now = int(time.time())
        base = server.catalog.base_name
        data = [{"id": n, "object": "model", "created": now, "owned_by": "tunesmith",
                 "root": n, "parent": None if n == base else base}
                for n in server.catalog.names()]  # fmt: skip
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req = await read_request(request, p.ChatCompletionRequest, server.args.max_request_bytes)
        adapter, system = served_model(server, req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]  # fmt: skip
        if system is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        try:
            text = server.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # jinja raises for orders the template does not allow
            msg = f"the chat template refused these messages: {e}"
            raise ApiError(400, msg, "messages") from None
        ids = server.tokenizer(text, add_special_tokens=False)["input_ids"]
        return await answer(server, request, req, ids, adapter, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await read_request(request, p.CompletionRequest, server.args.max_request_bytes)
        adapter, _ = served_model(server, req.model)
        ids = server.tokenizer(req.text())["input_ids"]
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        return await answer(server, request, req, ids, adapter, "text")

    return app


async def read_request(request: Request, model: type[BaseModel], limit: int) -> Any:
    """The validated body: 413 past ``limit`` bytes, 400 for bad JSON or a bad field."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise ApiError(413, f"the request body is {size} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"])
        raise ApiError(400, f"{field}: {err['msg']}", field or None) from None


def served_model(server: Server, name: str) -> tuple[tuple[str | None, Any], str | None]:
    """((peft adapter name, adapter), default system prompt) for a request's ``model``."""
    found = server.catalog.lookup(name)
    if found is None:
        names = ", ".join(server.catalog.names())
        raise ApiError(404, f"the model '{name}' does not exist; served: {names}", "model",
                       "model_not_found")  # fmt: skip
    peft_name, adapter = found
    system = adapter.system if adapter is not None else server.catalog.base_system
    return (peft_name, adapter), system


def make_job(server: Server, req: p.SamplingFields, ids: list[int],
             adapter: tuple[str | None, Any], emit: Any) -> Job:  # fmt: skip
    """The scheduler job for a validated request, after the prompt and length limits."""
    a = server.args
    if len(ids) > a.max_prompt_tokens:
        raise ApiError(400, f"the prompt is {len(ids)} tokens; the limit is "
                       f"{a.max_prompt_tokens}", "messages", "context_length_exceeded")  # fmt: skip
    wanted = req.wanted_tokens()
    if wanted is not None and wanted > a.max_tokens_limit:
        raise ApiError(400, f"max_tokens is {wanted}; the limit is {a.max_tokens_limit}",
                       "max_tokens")  # fmt: skip
    d = server.defaults
    sampling = Sampling(
        temperature=d["temperature"] if req.temperature is None else req.temperature,
        top_p=d["top_p"] if req.top_p is None else req.top_p,
        top_k=d["top_k"], repetition_penalty=d["repetition_penalty"], seed=req.seed,
    )  # fmt: skip
    peft_name, info = adapter
    path = info.path if info is not None else None
    deadline = time.monotonic() + a.request_timeout
    return Job(ids, peft_name, wanted or a.max_new_tokens, sampling, req.stops(), deadline,
               emit, adapter_path=path)  # fmt: skip


async def answer(server: Server, request: Request, req: p.SamplingFields, ids: list[int],
                 adapter: tuple[str | None, Any], kind: str) -> Response:  # fmt: skip
    """Queue the request and answer it, whole or streamed."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def emit(what: str, value: Any) -> None:  # on the scheduler thread
        # A closed event loop means the server is shutting down: nobody is listening.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(queue.put_nowait, (what, value))

    job = make_job(server, req, ids, adapter, emit)
    a = server.args
    if server.in_flight >= a.max_concurrent + a.max_queue:
        raise ApiError(429, f"the server is busy ({server.in_flight} requests in flight); "
                       "retry later", headers={"Retry-After": "1"})  # fmt: skip
    server.in_flight += 1
    released = False

    def release() -> None:  # once per request, however it ends
        nonlocal released
        if not released:
            released = True
            job.cancelled.set()
            server.in_flight -= 1

    server.scheduler.submit(job)
    if req.stream:
        return EventStream(stream(job, queue, req, kind), release)
    try:
        return await whole(request, job, queue, req, kind)
    finally:
        release()


class EventStream(StreamingResponse):
    """A server-sent event stream that calls ``release`` when it ends in any way: also
    when the client left before the first chunk (the generator then never runs)."""

    def __init__(self, content: Any, release: Any) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})  # fmt: skip
        self.release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Send the stream, then release the request's slot."""
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


async def whole(request: Request, job: Job, queue: asyncio.Queue, req: p.SamplingFields,
                kind: str) -> Response:  # fmt: skip
    """Wait for the full answer; stop generating if the client goes away."""
    parts: list[str] = []
    while True:
        try:
            what, value = await asyncio.wait_for(queue.get(), timeout=0.5)
        except TimeoutError:
            if await request.is_disconnected():
                return Response(status_code=499)  # nobody reads it; the slot is freed
            continue
        if what == "text":
            parts.append(value)
        elif what == "error":
            raise ApiError(500, value)
        else:
            finish, n = value
            if finish == "timeout":
                raise ApiError(504, "the request took longer than the server's "
                               "--request_timeout", code="timeout")  # fmt: skip
            use = p.usage(len(job.prompt), n)
            text = "".join(parts)
            if kind == "chat":
                rid = p.new_id("chatcmpl")
                return JSONResponse(p.chat_response(rid, req.model, text, finish, use))
            if isinstance(req, p.CompletionRequest) and req.echo:
                text = req.text() + text
            rid = p.new_id("cmpl")
            body = p.completion_response(rid, int(time.time()), req.model, text, finish, use)
            return JSONResponse(body)


def sse(obj: Any) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def stream(job: Job, queue: asyncio.Queue, req: p.SamplingFields,
                 kind: str):  # fmt: skip
    """The answer as OpenAI's stream of chunks, then ``data: [DONE]``.

    When the client disconnects, the ASGI server stops this generator (or a write to the
    closed socket fails), and :class:`EventStream` tells the scheduler to drop the row.
    """
    rid, created, model = (
        p.new_id("chatcmpl" if kind == "chat" else "cmpl"),
        int(time.time()),
        req.model,
    )
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
        if kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            return sse(p.chat_chunk(rid, created, model, delta, finish))
        return sse(p.completion_response(rid, created, model, text or "", finish, None))

    try:
        if kind == "chat":
            yield chunk(None, None, role=True)
        elif isinstance(req, p.CompletionRequest) and req.echo:
            yield chunk(req.text(), None)
        while True:
            what, value = await queue.get()
            if what == "text":
                yield chunk(value, None)
                continue
            if what == "error":
                yield sse(p.error_body(500, value))
                break
            finish, n = value
            if finish == "timeout":
                yield sse(p.error_body(504, "the request took longer than the server's "
                                       "--request_timeout", code="timeout"))  # fmt: skip
                break
            yield chunk(None, finish)
            if req.stream_options is not None and req.stream_options.include_usage:
                use = p.usage(len(job.prompt), n)
                yield sse(p.usage_chunk(rid, created, model, obj, use))
            break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()
