"""Control-plane messages of the KV transfer (small; KV bytes never travel in these).

Bootstrap (ZMQ REQ/REP to the prefill server's --disaggregation-bootstrap-port):
    prefill rank -> RegisterPrefillRankMsg -> BootstrapInfoMsg
    decode rank  -> QueryPrefillMsg        -> BootstrapInfoMsg (ready once every rank of the replica
                                              asked for registered; a prefill with --dp-size N replicas
                                              serves room r from replica r % N, SGLang's rule)

Per connection (UCX tag messages, decode rank -> prefill rank endpoint):
    decode  HelloMsg  -> prefill  HelloAckMsg (error = "" when the layouts are compatible)
Per room (every decode rank sends a RoomRequestMsg to every prefill rank of the prefill server):
    decode  RoomRequestMsg                          (how many pages the decode holds for the room, and
                                                     the fingerprint of the prompt it holds them for)
    prefill KVChunkMsg (before the gather), then the bytes as one UCX tag message (tag = KVChunkMsg.tag)  x N
            or, for a small host chunk (<= inline_data_bytes, CPU only), one control message: the
            KVChunkMsg with the bytes behind it in the same frame (see transfer/ucx.py)
            the last KVChunkMsg carries the done (num_chunks > 0, metadata)
    prefill RoomDoneMsg(num_chunks, metadata)       (only when the last send() had no pages)
    decode  RoomAckMsg                              (every chunk landed in the decode pool)
    either  RoomFailedMsg(reason)                   (abort, timeout, bad request, conflict: fail the room on both sides)

Direct peers (same host: the prefill mapped the decode's pool at the handshake, see direct.py):
    decode  RoomRequestMsg carries dst_pages
    prefill copies each chunk into those pages, then KVChunkMsg(direct=True) once the copy is done
    prefill RoomReleasedMsg                         (after a failure: no copy of the room is in flight,
                                                     so the decode may reuse the pages)

A room binds one request on both sides: the prefill's first send() and the decode's expect() carry
`prompt_fingerprint(input_ids)`; a request for a room whose prompt differs, or a room that already
ended here, fails with a "conflict: ..." reason on both sides and no page crosses.
    either  HeartbeatMsg                            (peer liveness, every heartbeat interval)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from disagg.common.messages import message
from disagg.transfer.layout import KVLayout

Room = int  # the bootstrap room id: unique per request across the fleet


def prompt_fingerprint(token_ids: list[int]) -> int:
    """What both sides of a room compare to prove it is the same request (0: not checked)."""
    digest = hashlib.blake2b(np.asarray(token_ids, dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1 or 1  # in [1, 2**63): msgpack packs it as an int64


@message
@dataclass
class RegisterPrefillRankMsg:
    layout: KVLayout
    host: str  # where this rank's UCX listener is reachable
    port: int
    dp_rank: int = 0  # --dp-size replicas: the replica this rank belongs to, of dp_size
    dp_size: int = 1


@message
@dataclass
class QueryPrefillMsg:
    dp_rank: int = 0  # the replica whose ranks are asked for (a room's: bootstrap_room % dp_size)


@message
@dataclass
class BootstrapInfoMsg:
    ready: bool  # False until all ranks of the replica asked for have registered
    ranks: list[RegisterPrefillRankMsg] = field(default_factory=list)  # sorted by rank (stage-major)
    error: str = ""
    dp_size: int = 0  # the prefill server's replicas (0: no rank registered yet)


@message
@dataclass
class HelloMsg:
    layout: KVLayout  # the decode rank's layout (its tp_rank / tp_size included)
    direct: dict[str, Any] = field(default_factory=dict)  # direct.export_pool of its pool ({}: UCX only)


@message
@dataclass
class HelloAckMsg:
    error: str = ""  # "" = compatible
    direct: bool = False  # the prefill rank mapped the decode's pool: it writes pages straight into it


@message
@dataclass
class RoomRequestMsg:
    room: Room
    decode_rank: int
    decode_tp: int
    num_pages: int  # the decode's pages for the room (the page indices stay on the decode side)
    fingerprint: int = 0  # prompt_fingerprint of the decode's request (0: not checked)
    dst_pages: list[int] = field(default_factory=list)  # the pages themselves, for a direct peer only


@message
@dataclass
class KVChunkMsg:
    room: Room
    page_offset: int  # index (in token order) of the chunk's first page among the room's pages
    num_pages: int
    head_start: int  # global KV heads [head_start, head_end) carried by this chunk
    head_end: int
    nbytes: int
    tag: int  # UCX tag of the data message that follows
    num_chunks: int = 0  # > 0 on the room's last chunk: chunks sent to this decode rank in all (the done)
    # with the done: the first token id (its logprobs, the cached tokens; the prompt's logprobs if asked)
    metadata: dict[str, Any] = field(default_factory=dict)
    direct: bool = False  # the bytes are already in the decode's pages (no data message follows)


@message
@dataclass
class RoomDoneMsg:
    room: Room
    num_chunks: int  # chunks sent to this decode rank for the room
    metadata: dict[str, Any] = field(default_factory=dict)  # e.g. the first generated token id


@message
@dataclass
class RoomAckMsg:
    room: Room


@message
@dataclass
class RoomFailedMsg:
    room: Room
    reason: str


@message
@dataclass
class RoomReleasedMsg:
    """A direct prefill rank will not write the room's decode pages any more (after a failure)."""

    room: Room


@message
@dataclass
class HeartbeatMsg:
    pass
