"""The admin and metrics token lockout (web/tokens.py) under parallel guesses, against real gunicorn on
the session's real Redis: each attempt is counted before its token is compared, so no more than
MAX_FAILURES guesses from one address are ever compared in a window, however many arrive at once."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from shared.keys import tokenfail_key
from tests.conftest import METRICS_TOKEN
from tools.stack import start_web, stop
from web.tokens import MAX_FAILURES

GUESSES = 64
PARALLEL = 32  # guesses sent at the same moment (a barrier), from one address


@pytest.fixture(scope="module")
def guarded(settings):
    """gunicorn with the session's METRICS_TOKEN: two processes of 16 threads each."""
    proc, url = start_web(settings, threads=16, processes=2)
    yield url
    stop(proc)


def test_parallel_wrong_tokens_get_no_more_than_the_limit_compared(guarded, redis_client):
    key = tokenfail_key("127.0.0.1")
    redis_client.delete(key)
    barrier = threading.Barrier(PARALLEL)

    def guess(n: int) -> int:
        if n < PARALLEL:
            barrier.wait(timeout=30)
        answer = requests.get(f"{guarded}/metrics", headers={"Authorization": f"Bearer guess-{n}"}, timeout=30)
        return answer.status_code

    try:
        with ThreadPoolExecutor(PARALLEL) as pool:
            codes = list(pool.map(guess, range(GUESSES)))
        right = requests.get(f"{guarded}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=30)
    finally:
        redis_client.delete(key)
    compared = codes.count(401)  # a 401 is a token compared and found wrong; a 429 was refused unread
    assert set(codes) <= {401, 429}, codes
    assert compared == MAX_FAILURES, f"{compared} of {GUESSES} parallel wrong tokens were compared"
    assert right.status_code == 429  # the window is used up, for the right token too
