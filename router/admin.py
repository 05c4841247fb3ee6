"""Authorization by role, and worker management over HTTP.

Roles: a client holds --api-key (if set); the admin holds --admin-api-key (else --api-key). The
admin's alone: worker management, /flush_cache, /eplb_rebalance, `abort_all`. Without any key, everyone is both.

    GET    /workers                    -> {"workers": [{url, role, bootstrap_port, healthy, ...}]}
    POST   /workers  {"url", "role", "bootstrap_port"}   (role: regular | prefill | decode)
    DELETE /workers?url=URL

plus SGLang's spellings: POST /add_worker?url=URL, POST /remove_worker?url=URL, GET /list_workers.
"""

from __future__ import annotations

import secrets

import orjson
from disagg.router.errors import error_response
from disagg.router.workers import Role
from starlette.requests import Request
from starlette.responses import JSONResponse, Response


class BadBody(ValueError):
    """A malformed request body: the client's mistake (400 naming `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param

    def response(self) -> Response:
        return error_response(400, str(self), "invalid_request_error", param=self.param)


def has_key(request: Request, key: str) -> bool:
    given = request.headers.get("authorization", "").encode("latin-1", "replace")
    return secrets.compare_digest(given, f"Bearer {key}".encode())


def admin_denied(request: Request, state, what: str) -> Response | None:
    """401 without a valid key, 403 with the client key only; None for the admin."""
    admin = state.config.effective_admin_api_key
    if not admin or has_key(request, admin):
        return None
    client = state.config.api_key
    if client and not has_key(request, client):
        return error_response(401, "invalid or missing API key", "authentication_error")
    return error_response(
        403,
        f"{what} needs the admin API key (--admin-api-key)",
        "permission_error",
        code="admin_key_required",
    )


async def json_object(request: Request, required: bool = True) -> dict:
    """The body as a JSON object ({} when empty and not required)."""
    body = await request.body()
    if not body and not required:
        return {}
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadBody(f"request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadBody("request body must be a JSON object")
    return value


def add_admin_routes(app, state) -> None:
    """The worker-management routes, the admin's only (both spellings: ours and SGLang's)."""
    routes = [("/workers", list_workers, "GET"), ("/workers", add_worker, "POST"),
              ("/workers", remove_worker, "DELETE"), ("/add_worker", add_worker, "POST"),
              ("/remove_worker", remove_worker, "POST"), ("/list_workers", list_urls, "GET")]  # fmt: skip
    for path, handler, method in routes:
        app.add_route(path, admin_only(handler, state), methods=[method])


def admin_only(handler, state):
    """`handler(request, state)` as a route that answers a caller without the admin key 401/403."""

    async def route(request: Request) -> Response:
        if (denied := admin_denied(request, state, "worker management")) is not None:
            return denied
        return await handler(request, state)

    return route


async def list_workers(request: Request, state) -> Response:
    return JSONResponse({"workers": [w.to_json() for w in state.registry.all()]})


async def list_urls(request: Request, state) -> Response:
    return JSONResponse({"urls": [w.url for w in state.registry.all()]})


async def add_worker(request: Request, state) -> Response:
    try:
        spec = await _worker_spec(request, state)
        worker = await state.add_worker(spec["url"], spec["role"], spec["bootstrap_port"])
    except BadBody as exc:
        return exc.response()
    except (ValueError, KeyError) as exc:
        return error_response(400, str(exc).strip("'\""), "invalid_request_error", param="url")
    return JSONResponse(worker.to_json(), status_code=201)


async def remove_worker(request: Request, state) -> Response:
    url = request.query_params.get("url")
    if url is None:
        try:
            url = (await json_object(request, required=False)).get("url")
        except BadBody as exc:
            return exc.response()
    if not isinstance(url, str) or not url or state.registry.get(url) is None:
        return error_response(404, f"no worker {url!r}", "not_found_error", param="url")
    return JSONResponse(state.registry.remove(url).to_json())


async def _worker_spec(request: Request, state) -> dict:
    """{"url", "role", "bootstrap_port"} from the JSON body or the query string (SGLang's /add_worker?url=)."""
    spec = await json_object(request, required=False) or dict(request.query_params)
    url = spec.get("url")
    if not isinstance(url, str) or not url:
        raise BadBody('give the worker as {"url": ..., "role": ...}', "url")
    default_role = "prefill" if state.config.pd_disaggregation else "regular"
    role_name = spec.get("role") or spec.get("worker_type") or default_role
    try:
        role = Role(role_name)
    except ValueError:
        raise BadBody(f"role must be one of {[r.value for r in Role]}, got {role_name!r}", "role") from None
    if (role is Role.REGULAR) == state.config.pd_disaggregation:
        raise BadBody(f"role {role.value!r} does not fit this router's mode", "role")
    port = spec.get("bootstrap_port")
    if port in ("", "none", None):
        port = None
    elif isinstance(port, str) and port.isdigit():
        port = int(port)
    if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536):
        raise BadBody(f"bootstrap_port must be a port number, got {port!r}", "bootstrap_port")
    return {"url": url, "role": role, "bootstrap_port": port}
