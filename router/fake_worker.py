"""A fake SGLang-compatible worker for router tests and benchmarks (no model).

    python -m disagg.router.fake_worker --port 31000 [--name w1] [--no-record]

It answers /generate, /v1/completions, /v1/chat/completions (JSON or SSE when "stream": true),
/health, /health_generate, /v1/models, /server_info, /model_info, /abort_request, /flush_cache and
/eplb_rebalance, and is steered
over HTTP: POST /_fake/config {"mode": "ok"|"fail"|"hang", "status": 500, "delay_secs": 0,
"chunks": 3, "chunk_delay_secs": 0, "healthy": true}; GET /_fake/log returns what it received
(bodies, aborts, disconnected streams); POST /_fake/reset clears the log.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

DEFAULTS = {
    "mode": "ok",
    "status": 500,
    "delay_secs": 0.0,
    "chunks": 3,
    "chunk_delay_secs": 0.0,
    "healthy": True,
}


def create_fake_app(name: str, record: bool = True) -> Starlette:
    conf = dict(DEFAULTS)
    log: dict[str, list] = {"requests": [], "aborts": [], "disconnects": [], "health_checks": [], "admin": []}

    async def infer(request: Request) -> Response:
        raw = await request.body()
        body = json.loads(raw) if raw else {}
        if record:
            headers = {k: v for k, v in request.headers.items() if k in ("authorization", "x-request-id")}
            log["requests"].append({"path": request.url.path, "body": body, "headers": headers})
        if conf["delay_secs"]:
            await asyncio.sleep(conf["delay_secs"])
        if conf["mode"] == "fail":
            error = {"message": f"{name} failing on purpose", "type": "server_error", "param": None}
            return JSONResponse({"error": {**error, "code": conf["status"]}}, status_code=conf["status"])
        if conf["mode"] == "hang":
            return StreamingResponse(_hang(body), media_type="text/event-stream")
        if body.get("stream"):
            return StreamingResponse(_sse(body), media_type="text/event-stream")
        return JSONResponse(_answer(request.url.path, body))

    def _answer(path: str, body: dict) -> dict:
        meta = {"worker": name, "bootstrap_room": body.get("bootstrap_room")}
        if path == "/generate":
            return {"text": f" from {name}", "meta_info": meta}
        return {
            "object": "chat.completion" if "chat" in path else "text_completion",
            "worker": name,
            "choices": [{"index": 0, "text": f" from {name}", "finish_reason": "stop"}],
            "meta_info": meta,
        }

    async def _sse(body: dict):
        try:
            for i in range(conf["chunks"]):
                if conf["chunk_delay_secs"]:
                    await asyncio.sleep(conf["chunk_delay_secs"])
                yield f"data: {json.dumps({'worker': name, 'index': i, 'text': f' tok{i}'})}\n\n".encode()
            yield b"data: [DONE]\n\n"
        except BaseException:
            log["disconnects"].append({"rid": body.get("rid"), "bootstrap_room": body.get("bootstrap_room")})
            raise

    async def _hang(body: dict):
        try:
            await asyncio.Event().wait()
            yield b""
        except BaseException:
            log["disconnects"].append({"rid": body.get("rid"), "bootstrap_room": body.get("bootstrap_room")})
            raise

    async def health(request: Request) -> Response:
        if record:
            log["health_checks"].append(request.headers.get("authorization"))
        return Response(status_code=200 if conf["healthy"] else 503)

    async def abort(request: Request) -> Response:
        log["aborts"].append(json.loads(await request.body() or b"{}"))
        return JSONResponse({"status": "ok"})

    async def info(request: Request) -> Response:
        return JSONResponse(
            {"object": "list", "worker": name, "data": [{"id": "fake-model", "object": "model"}]}
        )

    async def admin_command(request: Request) -> Response:
        """/flush_cache and /eplb_rebalance: recorded, answered as the steered mode says."""
        log["admin"].append({"path": request.url.path, "body": json.loads(await request.body() or b"{}")})
        if conf["mode"] == "fail":
            error = {"message": f"{name} refusing on purpose", "type": "invalid_request_error", "param": None}
            return JSONResponse({"error": {**error, "code": "refused"}}, status_code=conf["status"])
        return JSONResponse({"success": True, "worker": name})

    async def configure(request: Request) -> Response:
        conf.update(json.loads(await request.body() or b"{}"))
        return JSONResponse(conf)

    async def get_log(request: Request) -> Response:
        return JSONResponse(log)

    async def reset(request: Request) -> Response:
        for entries in log.values():
            entries.clear()
        conf.update(DEFAULTS)
        return JSONResponse({"status": "ok"})

    routes = [
        Route(p, infer, methods=["POST"]) for p in ("/generate", "/v1/completions", "/v1/chat/completions")
    ]
    routes += [Route(p, info) for p in ("/v1/models", "/server_info", "/get_server_info", "/model_info")]
    routes += [
        Route("/health", health),
        Route("/health_generate", health),
        Route("/abort_request", abort, methods=["POST"]),
        Route("/flush_cache", admin_command, methods=["POST"]),
        Route("/eplb_rebalance", admin_command, methods=["POST"]),
        Route("/_fake/config", configure, methods=["POST"]),
        Route("/_fake/log", get_log),
        Route("/_fake/reset", reset, methods=["POST"]),
    ]
    return Starlette(routes=routes)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="fake")
    parser.add_argument("--no-record", action="store_true", help="keep no log (benchmarks)")
    args = parser.parse_args(argv)
    app = create_fake_app(args.name, record=not args.no_record)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
