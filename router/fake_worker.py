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


class FakeWorker:
    """One fake worker's steerable state (`conf`, set over /_fake/config) and what it received (`log`)."""

    def __init__(self, name: str, record: bool = True):
        self.name = name
        self.record = record  # keep request bodies and health checks in the log (off in benchmarks)
        self.conf = dict(DEFAULTS)
        kinds = ("requests", "aborts", "disconnects", "health_checks", "admin")
        self.log: dict[str, list] = {kind: [] for kind in kinds}  # GET /_fake/log answers it

    def routes(self) -> list[Route]:
        inference = ("/generate", "/v1/completions", "/v1/chat/completions")
        routes = [Route(p, self.infer, methods=["POST"]) for p in inference]
        routes += [
            Route(p, self.info) for p in ("/v1/models", "/server_info", "/get_server_info", "/model_info")
        ]
        return routes + [
            Route("/health", self.health),
            Route("/health_generate", self.health),
            Route("/abort_request", self.abort, methods=["POST"]),
            Route("/flush_cache", self.admin_command, methods=["POST"]),
            Route("/eplb_rebalance", self.admin_command, methods=["POST"]),
            Route("/_fake/config", self.configure, methods=["POST"]),
            Route("/_fake/log", self.get_log),
            Route("/_fake/reset", self.reset, methods=["POST"]),
        ]

    # ---- inference -----------------------------------------------------------------------------

    async def infer(self, request: Request) -> Response:
        raw = await request.body()
        body = json.loads(raw) if raw else {}
        if self.record:
            headers = {k: v for k, v in request.headers.items() if k in ("authorization", "x-request-id")}
            self.log["requests"].append({"path": request.url.path, "body": body, "headers": headers})
        conf = self.conf
        if conf["delay_secs"]:
            await asyncio.sleep(conf["delay_secs"])
        if conf["mode"] == "fail":
            error = {"message": f"{self.name} failing on purpose", "type": "server_error", "param": None}
            return JSONResponse({"error": {**error, "code": conf["status"]}}, status_code=conf["status"])
        if conf["mode"] == "hang":
            return StreamingResponse(self._hang(body), media_type="text/event-stream")
        if body.get("stream"):
            return StreamingResponse(self._sse(body), media_type="text/event-stream")
        return JSONResponse(self._answer(request.url.path, body))

    def _answer(self, path: str, body: dict) -> dict:
        name = self.name
        meta = {"worker": name, "bootstrap_room": body.get("bootstrap_room")}
        if path == "/generate":
            return {"text": f" from {name}", "meta_info": meta}
        return {
            "object": "chat.completion" if "chat" in path else "text_completion",
            "worker": name,
            "choices": [{"index": 0, "text": f" from {name}", "finish_reason": "stop"}],
            "meta_info": meta,
        }

    async def _sse(self, body: dict):
        try:
            for i in range(self.conf["chunks"]):
                if self.conf["chunk_delay_secs"]:
                    await asyncio.sleep(self.conf["chunk_delay_secs"])
                yield f"data: {json.dumps({'worker': self.name, 'index': i, 'text': f' tok{i}'})}\n\n".encode()
            yield b"data: [DONE]\n\n"
        except BaseException:
            self._disconnected(body)
            raise

    async def _hang(self, body: dict):
        try:
            await asyncio.Event().wait()
            yield b""
        except BaseException:
            self._disconnected(body)
            raise

    def _disconnected(self, body: dict) -> None:
        self.log["disconnects"].append({"rid": body.get("rid"), "bootstrap_room": body.get("bootstrap_room")})

    # ---- the other endpoints -------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        if self.record:
            self.log["health_checks"].append(request.headers.get("authorization"))
        return Response(status_code=200 if self.conf["healthy"] else 503)

    async def abort(self, request: Request) -> Response:
        self.log["aborts"].append(json.loads(await request.body() or b"{}"))
        return JSONResponse({"status": "ok"})

    async def info(self, request: Request) -> Response:
        return JSONResponse(
            {"object": "list", "worker": self.name, "data": [{"id": "fake-model", "object": "model"}]}
        )

    async def admin_command(self, request: Request) -> Response:
        """/flush_cache and /eplb_rebalance: recorded, answered as the steered mode says."""
        self.log["admin"].append(
            {"path": request.url.path, "body": json.loads(await request.body() or b"{}")}
        )
        if self.conf["mode"] == "fail":
            error = {
                "message": f"{self.name} refusing on purpose",
                "type": "invalid_request_error",
                "param": None,
            }
            return JSONResponse({"error": {**error, "code": "refused"}}, status_code=self.conf["status"])
        return JSONResponse({"success": True, "worker": self.name})

    # ---- steering (/_fake/*) -------------------------------------------------------------------

    async def configure(self, request: Request) -> Response:
        self.conf.update(json.loads(await request.body() or b"{}"))
        return JSONResponse(self.conf)

    async def get_log(self, request: Request) -> Response:
        return JSONResponse(self.log)

    async def reset(self, request: Request) -> Response:
        for entries in self.log.values():
            entries.clear()
        self.conf.update(DEFAULTS)
        return JSONResponse({"status": "ok"})


def create_fake_app(name: str, record: bool = True) -> Starlette:
    return Starlette(routes=FakeWorker(name, record).routes())


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
