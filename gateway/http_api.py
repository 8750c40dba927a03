"""The gateway's OpenAI-compatible HTTP API: FastAPI on uvicorn, on the gateway's own loop.

`POST /v1/images/generations` (OpenAI's images API, with `stream: true` giving
server-sent `image_generation.partial_image` and `image_generation.completed` events),
`GET /v1/models`, `GET /healthz`. A request here takes the very path a gRPC `Generate`
takes -- `plan.make_plan`, `Gateway.admit`, `RequestRun.events`, `Gateway.finish` -- so it
shares the gateway's queues, admission bounds, retries and access log; this module only
translates (the shapes are gateway/openai_shapes.py) and serves. API keys are
gateway/auth.py's. uvicorn runs as a task on the gateway's event loop (no thread of its
own, no signal handlers: the gateway's server owns stopping) and stops, draining what it
has in hand, when the gateway stops. It serves HTTPS when the gateway serves TLS, with the
same certificate and, for mutual TLS, the same client CA (services/common/tls.py).
With tracing on, each generation is one SERVER span (`tracing.request_span`, continuing
the caller's `traceparent`) over its stage calls, as a gRPC request's is (`_in_span`).

It runs a little past 350 lines: the request path, the SSE stream and the server's
start and stop belong together; the JSON shapes already live in openai_shapes.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ditmesh.common import tracing
from ditmesh.common.errors import DitmeshError
from ditmesh.common.tls import ServerTLS
from ditmesh.gateway.auth import ApiKeys
from ditmesh.gateway.core import Gateway
from ditmesh.gateway.openai_shapes import (
    FORMAT_NAMES,
    OpenAIError,
    bad,
    completed_event,
    ditmesh_block,
    from_ditmesh,
    images_response,
    parse_generation,
    partial_image_event,
)
from ditmesh.gateway.plan import make_plan
from ditmesh.gateway.previews import whole_images
from ditmesh.gateway.run import RequestRun

log = logging.getLogger(__name__)

# Bodies are prompts and numbers (a prompt is at most 20 000 characters).
MAX_BODY_BYTES = 1024 * 1024
REQUEST_ID_HEADER = "x-request-id"
# How often a non-streamed request checks that its client is still there.
DISCONNECT_POLL_S = 0.5
GENERATIONS = "/v1/images/generations"
# FastAPI 0.165 and later trace (and meter, and log) requests themselves when OpenTelemetry
# is importable, with the global provider that tracing.setup installs: their SERVER span
# and the request's own (`_in_span`) would be siblings, or apart in two traces. The
# request's span is the one, as on the gRPC side; older FastAPI has no such option.
_NO_NATIVE_TELEMETRY = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI).parameters
    else {}
)


async def _finishing(gw: Gateway, run: RequestRun) -> AsyncIterator:
    """The run's events; frees its places and logs its access line however it ends (as
    GatewayService does for gRPC)."""
    status = "INTERNAL"
    try:
        async with contextlib.aclosing(run.events()) as events:
            async for event in events:
                yield event
        status = "OK"
    except DitmeshError as exc:
        status = exc.code.name
        raise
    except (asyncio.CancelledError, GeneratorExit):
        status = "CANCELLED by the client"
        raise
    finally:
        gw.finish(run, status)


@dataclass(frozen=True, slots=True)
class _Raised:
    """What ended a run in `_in_span`'s task, handed to its reader to raise."""

    error: Exception


_END = object()


async def _in_span(
    events: AsyncIterator, span: Callable[[], contextlib.AbstractContextManager]
) -> AsyncIterator:
    """`events`, run by a task of their own inside `span()`, handed over one by one.

    Why a task: a span is made current through a context variable, which must be set and
    reset in one task, and the stage calls' spans find their parent there. A streamed
    body is iterated by starlette's task and, when its client leaves mid-stream, closed
    later from another; a span entered in a generator would end in a foreign context. The
    task enters and leaves it itself, and holds it from the first stage call to the end.
    Closing this generator cancels the task, which closes `events` (freeing the run).
    """
    handoff: asyncio.Queue = asyncio.Queue(maxsize=1)

    async def pump() -> None:
        try:
            with span():
                async with contextlib.aclosing(events):
                    async for event in events:
                        await handoff.put(event)
        except Exception as exc:  # raised again by the reader: the error stays the run's
            await handoff.put(_Raised(exc))
            return
        await handoff.put(_END)

    pumping = asyncio.ensure_future(pump())
    try:
        while (item := await handoff.get()) is not _END:
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        pumping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pumping


async def _read_json(request: Request) -> object:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise OpenAIError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
    raw = b""
    async for part in request.stream():
        raw += part
        if len(raw) > MAX_BODY_BYTES:
            raise OpenAIError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise bad(f"the request body is not JSON: {exc}") from None


def _sse(payload: dict) -> bytes:
    return f"event: {payload.get('type', 'error')}\ndata: {json.dumps(payload)}\n\n".encode()


async def _collect(events: AsyncIterator) -> tuple[list, object]:
    chunks, finished = [], None
    async with contextlib.aclosing(events):
        async for ev in events:
            kind = ev.WhichOneof("event")
            if kind == "image":
                chunks.append(ev.image)
            elif kind == "finished":
                finished = ev.finished
    return whole_images(chunks), finished


async def _until_done_or_gone(request: Request, work: asyncio.Task):
    """`work`'s result; `work` is cancelled (its places freed) if the client leaves."""
    try:
        while not work.done():
            await asyncio.wait({work}, timeout=DISCONNECT_POLL_S)
            if not work.done() and await request.is_disconnected():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
                # Answered to no one (nginx's number for it); raised, the cancel would be
                # logged as an error of the app.
                raise OpenAIError(499, "the client closed the request", code="cancelled")
        return work.result()
    finally:
        work.cancel()


async def _stream(
    events: AsyncIterator, output_format: str, model: str, steps: int
) -> AsyncIterator[bytes]:
    chunks = []
    try:
        async with contextlib.aclosing(events):
            async for ev in events:
                kind = ev.WhichOneof("event")
                if kind == "partial_image":
                    yield _sse(partial_image_event(ev.partial_image, output_format))
                elif kind == "image":
                    chunks.append(ev.image)
                elif kind == "finished":
                    block = ditmesh_block(ev.request_id, model, steps, ev.finished)
                    for image in whole_images(chunks):
                        yield _sse(completed_event(image, output_format, block))
    except DitmeshError as exc:
        # The status line went out with the first event: errors from here travel as an
        # event the openai SDK raises as APIError.
        yield _sse(from_ditmesh(exc).body())


def make_app(gw: Gateway, keys: ApiKeys | None, serving: Callable[[], bool]) -> FastAPI:
    """The HTTP API of gateway `gw`; `serving()` says whether it takes work (/healthz)."""
    app = FastAPI(
        title="ditmesh", docs_url=None, redoc_url=None, openapi_url=None, **_NO_NATIVE_TELEMETRY
    )

    def error(exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status, headers=exc.headers())

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return error(exc)

    @app.exception_handler(DitmeshError)
    async def _ditmesh_error(request: Request, exc: DitmeshError) -> JSONResponse:
        return error(from_ditmesh(exc))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # Unknown paths and methods, in OpenAI's shape rather than FastAPI's.
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error(OpenAIError(exc.status_code, message, code="not_found"))

    def authorize(request: Request) -> None:
        if keys is not None:
            keys.check(request.headers.get("authorization"))

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        ok = serving()
        return JSONResponse({"status": "ok" if ok else "unavailable"}, 200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        data = [
            {
                "id": m.name,
                "object": "model",
                "created": 0,
                "owned_by": "ditmesh",
                "ditmesh": {
                    "family": m.family.name,
                    "default_size": f"{m.family.default_size}x{m.family.default_size}",
                    "default_steps": m.default_steps,
                    "default_guidance": m.default_guidance,
                    "size_multiple": m.size_multiple,
                    "default": m.name == gw.default_model,
                },
            }
            for m in gw.models.values()
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.post(GENERATIONS)
    async def generations(request: Request):
        authorize(request)
        g = parse_generation(await _read_json(request))
        rid = request.headers.get(REQUEST_ID_HEADER, "")
        plan = make_plan(g.request, gw.models, gw.default_model, gw.config.limits, rid)
        run = gw.admit(plan, gw.deadline_of(g.timeout))
        events = _finishing(gw, run)
        # Started at once (its first event is `queued`, which OpenAI's API has no word
        # for), so however the response ends, even unsent, closing it frees the run.
        await anext(events)
        if tracing.enabled():  # off, the run stays in the response's task: no extra one
            events = _in_span(
                events,
                lambda: tracing.request_span(
                    f"POST {GENERATIONS}", plan.request_id, request.headers
                ),
            )
        headers = {REQUEST_ID_HEADER: plan.request_id}
        output_format = FORMAT_NAMES[plan.output_format]
        if g.stream:
            body = _stream(events, output_format, plan.model.name, plan.steps)
            return StreamingResponse(body, media_type="text/event-stream", headers=headers)
        images, finished = await _until_done_or_gone(
            request, asyncio.ensure_future(_collect(events))
        )
        block = ditmesh_block(plan.request_id, plan.model.name, plan.steps, finished)
        return JSONResponse(images_response(images, output_format, block), headers=headers)

    return app


class HttpApi:
    """uvicorn serving an app as a task on the running loop, on a socket bound here (so a
    port in use is an OSError at start, not uvicorn's exit)."""

    def __init__(
        self, app: FastAPI, host: str, port: int, grace_seconds: float, tls: ServerTLS | None = None
    ) -> None:
        """`tls`: HTTPS with the gRPC server's certificate (and client CA); None: HTTP."""
        self.host = host
        self.scheme = "http" if tls is None else "https"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            access_log=False,  # the gateway's access log has every request, HTTP or gRPC
            timeout_graceful_shutdown=max(1, round(grace_seconds)),
            **(tls.uvicorn_options() if tls is not None else {}),
        )
        self._server = uvicorn.Server(config)
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._server.serve(sockets=[self._socket])
        )
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise OSError(f"the HTTP API on {self.url} stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stops taking connections; requests in hand run up to the grace, then are cut."""
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        self._socket.close()


def start_http_api(server, keys: ApiKeys | None, port: int, grace_seconds: float) -> HttpApi:
    """Starts the HTTP API of a running GatewayServer `server` (gateway/main.py's `serve`)
    on its loop and host; it stops first when the server stops."""
    gw = server.gateway

    def serving() -> bool:
        return not server.stopping and gw.healthy()

    app = make_app(gw, keys, serving)
    api = HttpApi(app, server.config.host, port, grace_seconds, server.config.tls)
    server.run(api.start())
    server.on_stop.insert(0, api.stop)
    log.info("gateway HTTP API listening on %s", api.url)
    return api
