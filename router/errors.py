"""OpenAI-style error objects: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import orjson
from starlette.responses import Response


def error_body(status: int, message: str, type_: str, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": status}})


def error_response(
    status: int, message: str, type_: str, param: str | None = None, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        error_body(status, message, type_, param), status, headers=headers, media_type="application/json"
    )
