"""Every file of the hostile/odd corpus gets exactly its expected answer; no 5xx; the worker lives."""
import pytest

from tests.conftest import submit, wait_done
from tests.corpus import CORPUS

pytestmark = pytest.mark.integration


def test_the_corpus_is_large_enough():
    assert len(CORPUS) >= 25


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_file_gets_its_expected_answer(worker, client, redis_client, name):
    data, expected = CORPUS[name]
    inflight_before = set(redis_client.scan_iter("inflight:*"))
    answer = submit(client, data, f"{name}.jpg")  # every file claims to be a JPEG
    assert answer.status_code < 500
    body = answer.get_json()
    if expected[0] == "refused":
        assert (answer.status_code, body["error"]["code"]) == expected[1:]
        assert set(redis_client.scan_iter("inflight:*")) == inflight_before  # nothing enqueued
        return
    assert answer.status_code in (200, 202), body
    job = wait_done(client, body["id"])
    assert job["status"] == expected[0], job["error"]
    if expected[0] == "failed":
        assert job["error"]["code"] == expected[1]
    assert worker.poll() is None
