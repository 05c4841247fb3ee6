"""Bootstrap: where a decode rank learns the UCX addresses and KV layouts of a prefill server's ranks.

Rank 0 of a prefill server runs `BootstrapServer` on --disaggregation-bootstrap-port (a ZMQ REP
socket served by a daemon thread). Every prefill rank registers its UCX listener address and
KVLayout; decode ranks query it (once per prefill server; the answer is cached by KVReceiver).
Ranks register under (dp_rank, rank), and a decode asks for the ranks of one DP rank (a room's:
room % N): with --enable-dp-attention the DP rank is the attention DP rank (rank 0 serves the
bootstrap); with --dp-size N replicas it is the replica, and the replicas' controller serves it
(`serve_for_replicas`), so one replica's death leaves the others reachable: the controller
marks the dead one (`replica_died`) and a decode asking for it is told so at once.
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
        # (replica, rank (pp_rank * tp + tp_rank)) -> registration
        self.ranks: dict[tuple[int, int], RegisterPrefillRankMsg] = {}
        self.dead: set[int] = set()  # replicas whose process died (their rooms cannot be served)
        self._lock = threading.Lock()  # the tables: the serving thread reads, replica_died writes
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
                with self._lock:
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
            self.ranks[(msg.dp_rank, msg.layout.rank)] = msg  # a restarted rank replaces its old entry
            self.dead.discard(msg.dp_rank)
            logger.info("prefill rank %d of replica %d registered at %s:%d", msg.layout.rank, msg.dp_rank,
                        msg.host, msg.port)  # fmt: skip
        elif not isinstance(msg, QueryPrefillMsg):
            return BootstrapInfoMsg(ready=False, error=f"unexpected message {type(msg).__name__}")
        return self._replica(msg.dp_rank)

    def _replica(self, dp_rank: int) -> BootstrapInfoMsg:
        """The ranks of replica `dp_rank`, once all of them registered (an error once it died)."""
        if dp_rank in self.dead:
            return BootstrapInfoMsg(
                ready=False, error=f"prefill replica {dp_rank} is down (its process died)"
            )
        ranks = [self.ranks[k] for k in sorted(self.ranks) if k[0] == dp_rank]
        ready = bool(ranks) and len(ranks) == ranks[0].layout.world_size
        dp_size = max((r.dp_size for r in self.ranks.values()), default=0)
        return BootstrapInfoMsg(ready=ready, ranks=ranks if ready else [], dp_size=dp_size)

    def replica_died(self, dp_rank: int) -> None:
        """Replica `dp_rank`'s process died: forget its ranks; a decode asking for it gets an error
        now instead of waiting for ranks that will never register (or dialling dead listeners)."""
        with self._lock:
            self.dead.add(dp_rank)
            for key in [k for k in self.ranks if k[0] == dp_rank]:
                del self.ranks[key]
        logger.warning("prefill replica %d died: the bootstrap answers its rooms with an error", dp_rank)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def serve_for_replicas(port: int) -> BootstrapServer:
    """The bootstrap of a prefill server with --dp-size replicas, run by their controller (started
    before the replicas, whose ranks all register with it)."""
    return BootstrapServer(port=port)


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


def query_prefill_ranks(
    host: str, port: int, timeout_s: float = 10.0, dp_rank: int = 0
) -> list[RegisterPrefillRankMsg]:
    """The ranks of the prefill server's replica `dp_rank` (0 without replicas), waiting (up to
    timeout_s) until all of them have registered."""
    reply = _poll(host, port, QueryPrefillMsg(dp_rank), timeout_s, lambda r: r.ready,
                  f"not all ranks of replica {dp_rank} registered")  # fmt: skip
    return reply.ranks


def query_prefill_dp_size(host: str, port: int, timeout_s: float = 10.0) -> int:
    """How many replicas (--dp-size) the prefill server runs, once one of its ranks registered."""
    # NOTE: asks for no replica (-1): replica 0 may be down, and the answer carries dp_size anyway
    return _poll(
        host, port, QueryPrefillMsg(-1), timeout_s, lambda r: r.dp_size > 0, "no rank registered"
    ).dp_size


def _poll(host: str, port: int, msg: QueryPrefillMsg, timeout_s: float, done, what: str) -> BootstrapInfoMsg:
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        reply = _request(host, port, msg, max(left, 0.1))
        if done(reply):
            return reply
        if left <= 0:
            raise BootstrapError(f"prefill server {host}:{port}: {what} within {timeout_s:.1f}s")
        time.sleep(0.05)
