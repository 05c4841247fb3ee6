"""The client's response once a worker answered: a whole body sent as is, or the relayed stream."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from disagg.router import metrics
from disagg.router.legs import Call, Leg
from disagg.router.relay import relay_stream
from starlette.responses import Response, StreamingResponse

if TYPE_CHECKING:
    from disagg.router.proxy import Proxy


def respond(proxy: Proxy, call: Call, leg: Leg, others: tuple[Leg, ...], on_done) -> Response | BytesResponse:
    """`leg` answered (its head and first bytes): the response for the client."""
    response = leg.response
    metrics.labelled(metrics.TTFT, call.path).observe(time.perf_counter() - call.started)
    headers = {"x-request-id": call.request_id}
    media_type = response.headers.get("content-type")
    if not leg.is_stream:
        leg.end()
        on_done(response.status)
        return BytesResponse(leg.first_chunk, response.status, media_type, call.request_id)
    return ProxyStreamingResponse(
        relay_stream(proxy, call, leg, others, on_done),
        status_code=response.status,
        headers=headers,
        media_type=media_type,
    )


class BytesResponse:
    """A whole worker answer, sent as is: two ASGI messages, none of Response's header building."""

    __slots__ = ("body", "status_code", "raw_headers")

    def __init__(self, body: bytes, status: int, media_type: str | None, request_id: str):
        self.body = body
        self.status_code = status
        self.raw_headers = [
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode("latin-1")),
        ]
        if media_type:
            self.raw_headers.append((b"content-type", media_type.encode("latin-1")))

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body})


class ProxyStreamingResponse(StreamingResponse):
    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()
