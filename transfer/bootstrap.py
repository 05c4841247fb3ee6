"""Bootstrap: where a decode rank learns the UCX addresses and KV layouts of a prefill server's ranks.

Rank 0 of a prefill server runs `BootstrapServer` on --disaggregation-bootstrap-port (a ZMQ REP
socket served by a daemon thread). Every prefill rank registers its UCX listener address and
KVLayout; decode ranks query it (once per prefill server; the answer is cached by KVReceiver).
"""

from __future__ import annotations

import logging
import threading
import time

import zmq
from disagg.common.messages import decode, encode
from disagg.transfer.protocol import BootstrapInfoMsg, QueryPrefillMsg, RegisterPrefillRankMsg

logger = logging.getLogger(__name__)


class BootstrapError(RuntimeError):
    """The bootstrap server is unreachable, not ready in time, or refused a registration."""


class BootstrapServer:
    def __init__(self, host: str = "0.0.0.0", port: int = 0) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        if port == 0:
            self.port = self._sock.bind_to_random_port(f"tcp://{host}")
        else:
            self._sock.bind(f"tcp://{host}:{port}")
            self.port = port
        self.ranks: dict[int, RegisterPrefillRankMsg] = {}  # rank (pp_rank * tp + tp_rank) -> registration
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="disagg-bootstrap", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            try:
                reply = self._handle(decode(self._sock.recv()))
            except Exception as e:  # noqa: BLE001 - a bad request gets an error reply, never a crash
                reply = BootstrapInfoMsg(ready=False, error=f"bad bootstrap request: {e}")
            self._sock.send(encode(reply))
        self._sock.close()
        self._ctx.term()

    def _handle(self, msg: object) -> BootstrapInfoMsg:
        if isinstance(msg, RegisterPrefillRankMsg):
            tp_sizes = {r.layout.tp_size for r in self.ranks.values()}
            if tp_sizes and msg.layout.tp_size not in tp_sizes:
                return BootstrapInfoMsg(
                    ready=False, error=f"tp_size {msg.layout.tp_size} != registered {tp_sizes}"
                )
            self.ranks[msg.layout.rank] = msg  # a restarted rank replaces its old entry
            logger.info("prefill rank %d registered at %s:%d", msg.layout.rank, msg.host, msg.port)
        elif not isinstance(msg, QueryPrefillMsg):
            return BootstrapInfoMsg(ready=False, error=f"unexpected message {type(msg).__name__}")
        ranks = [self.ranks[r] for r in sorted(self.ranks)]
        ready = bool(ranks) and len(ranks) == ranks[0].layout.world_size
        return BootstrapInfoMsg(ready=ready, ranks=ranks if ready else [])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _request(host: str, port: int, msg: object, timeout_s: float) -> BootstrapInfoMsg:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, max(1, int(timeout_s * 1000)))
    sock.connect(f"tcp://{host}:{port}")
    try:
        sock.send(encode(msg))
        reply = decode(sock.recv())
    except zmq.Again as e:
        raise BootstrapError(f"bootstrap server {host}:{port} did not answer within {timeout_s:.1f}s") from e
    finally:
        sock.close()
    if reply.error:
        raise BootstrapError(f"bootstrap server {host}:{port}: {reply.error}")
    return reply


def register_prefill_rank(
    host: str, port: int, info: RegisterPrefillRankMsg, timeout_s: float = 10.0
) -> None:
    _request(host, port, info, timeout_s)


def query_prefill_ranks(host: str, port: int, timeout_s: float = 10.0) -> list[RegisterPrefillRankMsg]:
    """The prefill server's ranks, waiting (up to timeout_s) until all of them have registered."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        reply = _request(host, port, QueryPrefillMsg(), max(left, 0.1))
        if reply.ready:
            return reply.ranks
        if left <= 0:
            raise BootstrapError(
                f"prefill server {host}:{port}: not all ranks registered within {timeout_s:.1f}s"
            )
        time.sleep(0.05)
