"""Failures fail only their own room, promptly, on both sides, with nothing left behind."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from disagg.common.shm import shareable_zeros
from disagg.transfer import KVLayout, KVLayoutMismatchError, KVReceiver, KVSender
from disagg.transfer.testing import full_pool, scripted_decode_main, scripted_prefill_main, wait_results
from prometheus_client import REGISTRY

from tests.procs import SPAWN, join_or_kill, spawn

HOST = "127.0.0.1"


def _layout(**kw) -> KVLayout:
    base = dict(num_layers=2, page_size=4, num_kv_heads_total=2, head_dim=8, dtype="float32", model_name="m")
    return KVLayout(**{**base, **kw})


def _decode_pool(layout: KVLayout, num_pages: int, direct: bool) -> torch.Tensor:
    """direct: a memfd pool, which a same-host prefill maps and copies into (transfer/direct.py)."""
    if direct:
        return shareable_zeros(layout.pool_shape(num_pages), layout.torch_dtype)
    return torch.zeros(layout.pool_shape(num_pages), dtype=layout.torch_dtype)


@pytest.fixture(params=[False, True], ids=["ucx", "direct"])
def pair(request):
    """A prefill sender and a decode receiver in this process, with a 1.5 s transfer timeout;
    the pages move over UCX or (direct) are copied straight into the decode's pool."""
    layout = _layout()
    sender = KVSender(full_pool(layout, 64, seed=0), layout, HOST, 0, host=HOST, timeout_s=1.5)
    receiver = KVReceiver(_decode_pool(layout, 64, request.param), layout, timeout_s=1.5)
    receiver.connect(HOST, sender.bootstrap_port)
    assert receiver.ucx.run_sync(lambda: [p.direct for p in receiver.peers]) == [request.param]
    try:
        yield sender, receiver
    finally:
        receiver.close()
        sender.close()


def _failures(role: str, reason: str) -> float:
    return (
        REGISTRY.get_sample_value("disagg_kv_transfer_failures_total", {"role": role, "reason": reason})
        or 0.0
    )


def test_timeout_fails_only_its_rooms_on_both_sides(pair) -> None:
    sender, receiver = pair
    port = sender.bootstrap_port
    before = _failures("decode", "timeout")
    receiver.expect(1, HOST, port, [0, 1, 2])  # completes
    receiver.expect(2, HOST, port, [3, 4, 5])  # prefill stalls after the first chunk
    receiver.expect(3, HOST, port, [6])  # prefill never sends it
    sender.send(1, [10, 11, 12], 0, is_last=True)
    sender.send(2, [13], 0)
    sender.send(4, [14], 0, is_last=True)  # decode never expects it
    start = time.monotonic()
    sent, got = wait_results(sender, {1, 2, 4}, 10), wait_results(receiver, {1, 2, 3}, 10)
    elapsed = time.monotonic() - start
    assert sent[1].ok and got[1].ok
    for results, rooms in ((sent, (2, 4)), (got, (2, 3))):
        for room in rooms:
            assert not results[room].ok and results[room].reason.startswith("timeout"), results[room]
    assert elapsed < 1.5 + 2.0, f"timeouts took {elapsed:.1f}s"
    assert sender.num_active_rooms() == 0 and receiver.num_active_rooms() == 0
    assert _failures("decode", "timeout") == before + 2


def test_bad_requests_fail_only_their_room(pair) -> None:
    sender, receiver = pair
    port = sender.bootstrap_port
    with pytest.raises(ValueError, match="dst_pages"):
        receiver.expect(9, HOST, port, [63, 64])  # page 64 is outside the 64-page pool
    receiver.expect(1, HOST, port, [0, 1])
    with pytest.raises(ValueError, match="already expected"):
        receiver.expect(1, HOST, port, [2])
    receiver.expect(2, HOST, port, [3, 4])
    receiver.expect(3, HOST, port, [5, 6])
    sender.send(1, [10, 11], 0, is_last=True)
    sender.send(2, [12, 13, 14], 0, is_last=True)  # three pages for a two-page destination
    sender.send(3, [15], 0)
    receiver.abort(3)  # the decode server gives up on room 3 (e.g. the client went away)
    sent, got = wait_results(sender, {1, 2, 3}, 1.0), wait_results(receiver, {1, 2, 3}, 1.0)
    assert sent[1].ok and got[1].ok
    assert sent[2].reason.startswith("bad_request") and got[2].reason.startswith("bad_request")
    assert sent[3].reason.startswith("aborted") and got[3].reason.startswith("aborted")
    sender.send(3, [16], 1, is_last=True)  # a late chunk of the aborted room is dropped
    time.sleep(0.2)
    assert sender.poll() == [] and receiver.poll() == []
    assert sender.num_active_rooms() == 0 and receiver.num_active_rooms() == 0


def test_incompatible_layouts_are_refused_with_a_clear_error(pair) -> None:
    sender, _ = pair
    layout = _layout(page_size=16, dtype="bfloat16")
    receiver = KVReceiver(torch.zeros(layout.pool_shape(8), dtype=torch.bfloat16), layout, timeout_s=1.5)
    try:
        with pytest.raises(
            KVLayoutMismatchError, match=r"page_size: 16 != 4.*dtype: 'bfloat16' != 'float32'"
        ):
            receiver.connect(HOST, sender.bootstrap_port)
        receiver.expect(1, HOST, sender.bootstrap_port, [0])
        result = wait_results(receiver, {1}, 5)[1]
        assert not result.ok and result.reason.startswith("incompatible")
    finally:
        receiver.close()


def test_an_mla_pool_and_a_per_head_pool_of_the_same_shape_do_not_pair() -> None:
    """A latent page and a K|V page can have the same size (1 "head" of latent/2): the layout kind is
    compared, so a DeepSeek decode never takes another model's per-head pages as latents."""
    mha = _layout(num_kv_heads_total=1)
    mla = _layout(num_kv_heads_total=1, kv_kind="mla")
    assert mha.pool_shape(8) == mla.pool_shape(8)
    with pytest.raises(KVLayoutMismatchError, match="kv_kind: 'mha' != 'mla'"):
        mha.check_compatible(mla)
    assert mha.identity() != mla.identity()  # the router does not pair them either


def _spawn(target, *args):
    out = SPAWN.Queue()
    return spawn(target, *args, out), out


def _stop(proc) -> None:
    join_or_kill([proc], timeout=0)


@pytest.mark.slow
@pytest.mark.parametrize("direct", [False, True], ids=["ucx", "direct"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_prefill_dying_mid_transfer_fails_its_rooms_promptly(sig: signal.Signals, direct: bool) -> None:
    """SIGKILL is seen through the UCX endpoint error; a hung (SIGSTOPped) peer through heartbeats.
    A direct prefill rank's hold on the room's pages ends with it (a stopped one checks the decode's
    liveness before any later copy)."""
    layout = _layout()
    sends = [(1, [1, 2], 0, True), (2, [3], 0, False)]  # room 2 never gets its last chunk
    proc, out = _spawn(scripted_prefill_main, layout, 16, 0, sends)
    receiver = KVReceiver(
        _decode_pool(layout, 16, direct), layout, timeout_s=30, heartbeat_s=0.5, heartbeat_timeout_s=2
    )
    try:
        port = out.get(timeout=60)[1]
        receiver.expect(1, HOST, port, [5, 6])
        receiver.expect(2, HOST, port, [7, 8])
        assert wait_results(receiver, {1}, 30)[1].ok
        os.kill(proc.pid, sig)
        start = time.monotonic()
        failed = wait_results(receiver, {2}, 10)[2]
        assert not failed.ok and failed.reason.startswith("peer_died"), failed
        assert time.monotonic() - start < 4.0  # far below the 30 s transfer timeout
        assert receiver.num_active_rooms() == 0
    finally:
        receiver.close()
        _stop(proc)


@pytest.mark.slow
def test_decode_dying_mid_transfer_fails_its_rooms_promptly() -> None:
    layout = _layout()
    sender = KVSender(full_pool(layout, 16, seed=0), layout, HOST, 0, host=HOST, timeout_s=30)
    proc, out = _spawn(scripted_decode_main, layout, sender.bootstrap_port, 16, [(1, [1, 2]), (2, [3, 4])])
    try:
        assert out.get(timeout=60)[0] == "expecting"
        sender.send(1, [5, 6], 0, is_last=True)
        sender.send(2, [7], 0)
        assert wait_results(sender, {1}, 30)[1].ok
        os.kill(proc.pid, signal.SIGKILL)
        start = time.monotonic()
        failed = wait_results(sender, {2}, 10)[2]
        assert not failed.ok and failed.reason.startswith("peer_died"), failed
        assert time.monotonic() - start < 4.0
        assert sender.num_active_rooms() == 0
    finally:
        sender.close()
        _stop(proc)


def test_a_room_binds_one_prompt_and_is_never_reused(pair) -> None:
    """Two requests crossing on one room id, or a room used again after it ended, fail at once on
    both sides with a `conflict` reason, and no page of the other request lands."""
    from disagg.transfer.protocol import prompt_fingerprint as fp

    sender, receiver = pair
    port = sender.bootstrap_port
    start = time.monotonic()
    receiver.expect(1, HOST, port, [0, 1], fingerprint=fp([5, 6, 7]))  # the decode holds room 1 for B
    sender.send(1, [10, 11], 0, is_last=True, fingerprint=fp([1, 2, 3]))  # the prefill computed A
    receiver.expect(2, HOST, port, [2], fingerprint=fp([1, 2]))  # one prompt on both sides: fine
    sender.send(2, [12], 0, is_last=True, fingerprint=fp([1, 2]))
    sent, got = wait_results(sender, {1, 2}, 10), wait_results(receiver, {1, 2}, 10)
    assert sent[2].ok and got[2].ok
    assert sent[1].reason.startswith("conflict") and got[1].reason.startswith("conflict"), (sent[1], got[1])
    assert not receiver.kv_buffer[:, 0:2].any()  # nothing of A reached B's pages
    receiver.expect(2, HOST, port, [3], fingerprint=fp([1, 2]))  # room 2 again, after it completed
    sender.send(2, [13], 0, is_last=True, fingerprint=fp([1, 2]))
    sent, got = wait_results(sender, {2}, 10), wait_results(receiver, {2}, 10)
    assert sent[2].reason.startswith("conflict") and got[2].reason.startswith("conflict"), (sent[2], got[2])
    assert not receiver.kv_buffer[:, 3].any()
    assert time.monotonic() - start < 1.5  # refused, not timed out
    assert sender.num_active_rooms() == 0 and receiver.num_active_rooms() == 0
