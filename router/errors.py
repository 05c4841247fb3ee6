"""OpenAI-style error objects: {"error": {"message", "type", "param", "code"}}, `code` always a string.

Like the servers' (common/server/protocol.py): 4xx are the client's mistakes, 5xx the system's
failures with a typed code.
"""

from __future__ import annotations

import logging

import orjson
from starlette.responses import Response

logger = logging.getLogger("disagg.router")

CODES = {
    400: "invalid_value",
    401: "invalid_api_key",
    403: "admin_key_required",
    404: "not_found",
    405: "method_not_allowed",
    408: "queue_timeout",
    413: "request_too_large",
    429: "rate_limited",
    500: "internal_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}


def error_body(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None
) -> bytes:
    code = code or CODES.get(status, f"http_{status}")
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def error_response(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    code: str | None = None,
) -> Response:
    return Response(
        error_body(status, message, type_, param, code),
        status,
        headers=headers,
        media_type="application/json",
    )


async def call_guarded(app, scope, receive, send) -> None:
    """Run an ASGI app; an unexpected exception before the response started answers an OpenAI-style
    500 instead of a plain-text one (Starlette's handler also re-raises, and uvicorn then drops the
    keep-alive connection)."""
    started = False

    async def tracked_send(msg) -> None:
        nonlocal started
        started = started or msg["type"] == "http.response.start"
        await send(msg)

    try:
        await app(scope, receive, tracked_send)
    except Exception as exc:
        logger.exception("unhandled error on %s", scope.get("path"))
        if started:
            raise
        response = error_response(
            500, f"router internal error: {type(exc).__name__}: {exc}", "internal_error"
        )
        await response(scope, receive, send)
