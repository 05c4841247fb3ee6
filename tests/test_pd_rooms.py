"""A bootstrap room binds one request on both sides (issue 22, room integrity): two clients crossing
on one room id, or a room used again after it ended, get 409 at once, never each other's text, and
both servers end with nothing held."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import pytest

from tests.pd_helpers import PDCluster, assert_pool_free

pytestmark = pytest.mark.slow

PROMPT_A, PROMPT_B = "The capital of Italy is", "A recipe for pancakes:"


@pytest.fixture(scope="module")
def pd():
    with PDCluster(router=None, timeout=10.0) as cluster:
        yield cluster


def _leg(server, prompt: str, room: int, pd: PDCluster) -> httpx.Response:
    body = {"text": prompt, "sampling_params": {"max_new_tokens": 8, "temperature": 0},
            "bootstrap_host": "127.0.0.1", "bootstrap_port": pd.bootstrap_port, "bootstrap_room": room}  # fmt: skip
    return httpx.post(server.url + "/generate", json=body, timeout=60)


def test_crossed_requests_on_one_room_get_409_not_each_others_text(pd):
    room = 424242
    start = time.monotonic()
    with cf.ThreadPoolExecutor(4) as pool:
        a_prefill = pool.submit(_leg, pd.prefill, PROMPT_A, room, pd)
        b_decode = pool.submit(_leg, pd.decode, PROMPT_B, room, pd)
        time.sleep(0.5)  # A's prefill and B's decode claimed the room; now the other halves arrive
        b_prefill = pool.submit(_leg, pd.prefill, PROMPT_B, room, pd)
        a_decode = pool.submit(_leg, pd.decode, PROMPT_A, room, pd)
        answers = [f.result() for f in (a_prefill, b_decode, b_prefill, a_decode)]
    assert time.monotonic() - start < 8  # refused, not left to the 10 s transfer timeout
    for r in answers:
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "bootstrap_room_in_use"
    assert_pool_free(pd.prefill)
    assert_pool_free(pd.decode)


def test_a_room_used_again_after_it_ended_gets_409(pd):
    room = 777
    with cf.ThreadPoolExecutor(2) as pool:
        first = [pool.submit(_leg, s, PROMPT_A, room, pd) for s in (pd.prefill, pd.decode)]
        prefill, decode = (f.result() for f in first)
    assert prefill.status_code == 200 and decode.status_code == 200, (prefill.text, decode.text)
    assert len(decode.json()["output_ids"]) == 8
    start = time.monotonic()
    with cf.ThreadPoolExecutor(2) as pool:
        again = [pool.submit(_leg, s, PROMPT_A, room, pd) for s in (pd.prefill, pd.decode)]
        answers = [f.result() for f in again]
    assert time.monotonic() - start < 5
    assert [r.status_code for r in answers] == [409, 409], [r.text for r in answers]
    assert_pool_free(pd.prefill)
    assert_pool_free(pd.decode)
