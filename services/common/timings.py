"""How much of a stage call was the stage's own work, measured by the stage itself.

The gateway times every call it makes to a stage (gateway/timings.py) but cannot tell
work from bytes on the wire; the stage can. `WorkClock`, installed on every stage
server by `start_server`, times a response-streaming call's work: the handler's own
time, less what it spent waiting for the caller's request messages and what it was
held sending its answers. `phase` names a part of that work (the VAE's image
encoding), and is a span of its own when tracing is on. Both travel back in one
trailing metadata entry, `x-ditmesh-timings: work=0.512;image_encode=0.203`, read by
`parse`. What the gateway makes of them (queue, transfer) is its business.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar

import grpc

from ditmesh.common import tracing

TIMINGS_KEY = "x-ditmesh-timings"

# Probes and tool queries are not work; a health Watch stream lasts as long as its caller.
_UNTIMED = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class CallClock:
    """The seconds of one call: its work, the waits inside it, and its named phases."""

    __slots__ = ("busy", "waiting", "phases")

    def __init__(self) -> None:
        self.busy = 0.0
        """Seconds inside the handler (its waits for request messages included)."""
        self.waiting = 0.0
        """Seconds of `busy` spent waiting for the caller's next request message."""
        self.phases: dict[str, float] = {}

    def encode(self) -> str:
        parts = {"work": max(0.0, self.busy - self.waiting), **self.phases}
        return ";".join(f"{k}={v:.6f}" for k, v in parts.items())


_current: ContextVar[CallClock | None] = ContextVar("ditmesh_call_clock", default=None)


@contextlib.contextmanager
def phase(name: str, **attributes) -> Iterator[None]:
    """Times a named part of the current call's work (and traces it as a span `name`)."""
    clock = _current.get()
    with tracing.span(name, **attributes):
        start = time.perf_counter()
        try:
            yield
        finally:
            if clock is not None:
                clock.phases[name] = clock.phases.get(name, 0.0) + time.perf_counter() - start


def parse(metadata) -> dict[str, float]:
    """The timings a stage sent in its trailing metadata ({} if it sent none)."""
    for key, value in metadata or ():
        if key == TIMINGS_KEY:
            pairs = (item.split("=", 1) for item in str(value).split(";") if "=" in item)
            return {k: float(v) for k, v in pairs}
    return {}


def _timed_requests(requests, clock: CallClock):
    while True:
        start = time.perf_counter()
        try:
            item = next(requests)
        except StopIteration:
            return
        finally:
            clock.waiting += time.perf_counter() - start
        yield item


class WorkClock(grpc.ServerInterceptor):
    """Sends each response-streaming call's `CallClock` in its trailing metadata."""

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not handler.response_streaming or details.method.startswith(_UNTIMED):
            return handler
        streamed_in = handler.request_streaming
        fn = handler.stream_stream if streamed_in else handler.unary_stream

        def behaviour(request, context):
            clock = CallClock()
            # The sync server runs the whole stream in one pool thread: the phases the
            # servicer marks in that thread find this clock.
            _current.set(clock)
            tracing.tag_request(context)
            if streamed_in:
                request = _timed_requests(request, clock)
            answers = fn(request, context)
            try:
                while True:
                    start = time.perf_counter()
                    try:
                        item = next(answers)
                    except StopIteration:
                        break
                    finally:
                        clock.busy += time.perf_counter() - start
                    yield item  # held here while gRPC sends it: not work
            finally:
                answers.close()
                _current.set(None)
            context.set_trailing_metadata(((TIMINGS_KEY, clock.encode()),))

        make = (
            grpc.stream_stream_rpc_method_handler
            if streamed_in
            else grpc.unary_stream_rpc_method_handler
        )
        return make(
            behaviour,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
