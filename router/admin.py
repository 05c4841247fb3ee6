"""Worker management over HTTP, behind the admin key (--admin-api-key, else --api-key):

    GET    /workers                    -> {"workers": [{url, role, bootstrap_port, healthy, ...}]}
    POST   /workers  {"url", "role", "bootstrap_port"}   (role: regular | prefill | decode)
    DELETE /workers?url=URL

plus SGLang's spellings: POST /add_worker?url=URL, POST /remove_worker?url=URL, GET /list_workers.
"""

from __future__ import annotations

import orjson
from disagg.router.errors import error_response
from disagg.router.workers import Role
from starlette.requests import Request
from starlette.responses import JSONResponse, Response


def add_admin_routes(app, state) -> None:
    async def list_workers(request: Request) -> Response:
        if (denied := _admin_denied(request, state)) is not None:
            return denied
        return JSONResponse({"workers": [w.to_json() for w in state.registry.all()]})

    async def add_worker(request: Request) -> Response:
        if (denied := _admin_denied(request, state)) is not None:
            return denied
        try:
            spec = await _worker_spec(request, state)
            worker = await state.add_worker(spec["url"], spec["role"], spec["bootstrap_port"])
        except (ValueError, KeyError) as exc:
            return error_response(400, str(exc).strip("'\""), "invalid_request_error", param="url")
        return JSONResponse(worker.to_json(), status_code=201)

    async def remove_worker(request: Request) -> Response:
        if (denied := _admin_denied(request, state)) is not None:
            return denied
        url = request.query_params.get("url")
        if url is None and (body := await request.body()):
            url = orjson.loads(body).get("url")
        if not url or state.registry.get(url) is None:
            return error_response(404, f"no worker {url!r}", "not_found_error", param="url")
        worker = state.registry.remove(url)
        return JSONResponse(worker.to_json())

    async def list_urls(request: Request) -> Response:
        if (denied := _admin_denied(request, state)) is not None:
            return denied
        return JSONResponse({"urls": [w.url for w in state.registry.all()]})

    app.add_route("/workers", list_workers, methods=["GET"])
    app.add_route("/workers", add_worker, methods=["POST"])
    app.add_route("/workers", remove_worker, methods=["DELETE"])
    app.add_route("/add_worker", add_worker, methods=["POST"])
    app.add_route("/remove_worker", remove_worker, methods=["POST"])
    app.add_route("/list_workers", list_urls, methods=["GET"])


def _admin_denied(request: Request, state) -> Response | None:
    key = state.config.effective_admin_api_key
    if key and request.headers.get("authorization") != f"Bearer {key}":
        return error_response(401, "worker management needs the admin API key", "authentication_error")
    return None


async def _worker_spec(request: Request, state) -> dict:
    """{"url", "role", "bootstrap_port"} from the JSON body or the query string (SGLang's /add_worker?url=)."""
    body = await request.body()
    try:
        spec = orjson.loads(body) if body else dict(request.query_params)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(spec, dict) or not spec.get("url"):
        raise ValueError('give the worker as {"url": ..., "role": ...}')
    default_role = "prefill" if state.config.pd_disaggregation else "regular"
    role = Role(spec.get("role") or spec.get("worker_type") or default_role)
    if (role is Role.REGULAR) == state.config.pd_disaggregation:
        raise ValueError(f"role {role.value!r} does not fit this router's mode")
    port = spec.get("bootstrap_port")
    if port in ("", "none", None):
        port = None
    return {"url": spec["url"], "role": role, "bootstrap_port": int(port) if port is not None else None}
