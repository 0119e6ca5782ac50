"""Prometheus metrics: the Redis-held series (shared/stats.py) and ``GET /metrics`` on the real stack."""
from __future__ import annotations

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from shared import stats
from shared.metrics import exposition, registry_for
from tests import images
from tests.conftest import METRICS_TOKEN, wait_done

SCRATCH_DB = 11  # unit tests write here, away from the session worker's data in db 0


def samples(text: str) -> dict[tuple, float]:
    """Parse a Prometheus exposition; return {(sample name, sorted labels): value}."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(parsed: dict[tuple, float], name: str, **labels) -> float:
    """Sum the samples called ``name`` whose labels include ``labels``."""
    return sum(value for (sample, sample_labels), value in parsed.items()
               if sample == name and labels.items() <= dict(sample_labels).items())


@pytest.fixture
def scratch(redis_url):
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + f"/{SCRATCH_DB}")
    client.flushdb()
    yield client
    client.flushdb()


def test_histograms_counters_and_the_worker_filter(scratch):
    a = {"model": "m", "device": "cuda:0", "worker": "a@h"}
    stats.record_batch(scratch, a, [(0.2, 0.004), (0.3, 0.02), (7.0, 0.02)], batch_size=3)
    stats.record_batch(scratch, {**a, "worker": "b@h", "device": "cpu"}, [(1.0, 0.5)], batch_size=1)
    stats.record_failures(scratch, a, 2)
    stats.record_claim_outcomes(scratch, a, deadline_exceeded=4, skipped=1)
    stats.record_claim_outcomes(scratch, a, deadline_exceeded=0, skipped=2)
    stats.record_submission(scratch, "m", cached=True)
    stats.record_submission(scratch, "m", cached=False)

    fleet = samples(exposition(registry_for(scratch, ttl_s=10, models=["m"])).decode())
    labels = tuple(sorted(a.items()))
    assert fleet[("imgsvc_inference_seconds_bucket", tuple(sorted({**a, "le": "0.005"}.items())))] == 1
    assert fleet[("imgsvc_inference_seconds_bucket", tuple(sorted({**a, "le": "0.025"}.items())))] == 3
    assert fleet[("imgsvc_end_to_end_seconds_bucket", tuple(sorted({**a, "le": "5.0"}.items())))] == 2
    assert fleet[("imgsvc_end_to_end_seconds_bucket", tuple(sorted({**a, "le": "+Inf"}.items())))] == 3
    assert fleet[("imgsvc_end_to_end_seconds_sum", labels)] == pytest.approx(7.5)
    assert fleet[("imgsvc_batch_size_count", labels)] == 1
    assert fleet[("imgsvc_jobs_completed_total", labels)] == 3
    assert fleet[("imgsvc_jobs_failed_total", labels)] == 2
    assert fleet[("imgsvc_jobs_deadline_exceeded_total", labels)] == 4
    assert fleet[("imgsvc_computations_skipped_total", labels)] == 3
    assert total(fleet, "imgsvc_jobs_submitted_total", model="m") == 2
    assert total(fleet, "imgsvc_cache_hits_total") == total(fleet, "imgsvc_cache_misses_total") == 1
    assert fleet[("imgsvc_queue_depth", (("queue", "inference.m"),))] == 0

    only_a = samples(exposition(registry_for(scratch, ttl_s=10, models=["m"], worker="a@h")).decode())
    assert total(only_a, "imgsvc_jobs_completed_total") == 3  # b@h's job is not a's
    assert total(only_a, "imgsvc_jobs_submitted_total") == 0  # the web tier's counts are not a worker's


def test_minute_windows_summarise_throughput_latency_and_cache(scratch):
    now = 1_800_000_000.0
    labels = {"model": "m", "device": "cpu", "worker": "a@h"}
    stats.record_batch(scratch, labels, [(0.1 * i, 0.01) for i in range(1, 11)], 10, now=now - 120)
    stats.record_batch(scratch, labels, [(2.0, 0.05)], 1, now=now)
    stats.record_submission(scratch, "m", cached=True, now=now)
    stats.record_queue_depths(scratch, {"inference.m": 7}, now=now)
    buckets = stats.read_minutes(scratch, 60, ["m"], now=now)
    last_minute = stats.summarise(buckets[-1:], ["m"])
    assert last_minute["models"]["m"]["done"] == 1 and last_minute["cache"]["hit_rate"] == 1.0
    five = stats.summarise(buckets[-5:], ["m"])["models"]["m"]
    assert five["done"] == 11 and five["per_second"] == pytest.approx(11 / 300, abs=1e-4)
    assert five["latency_ms"] == {"p50": 600.0, "p95": 2000.0}
    series = stats.chart_series(buckets, ["m"])
    assert len(series) == 60 and series[-1]["queue_depth"] == {"inference.m": 7} and series[-3]["done"] == 10


@pytest.mark.parametrize("values, q, expected", [([], 0.5, None), ([3.0], 0.95, 3.0),
                                                 ([1, 2, 3, 4], 0.5, 2), (list(range(1, 101)), 0.95, 95)])
def test_percentile_is_nearest_rank(values, q, expected):
    assert stats.percentile(values, q) == expected


@pytest.mark.integration
def test_web_metrics_parse_and_move_as_jobs_run(base_url, client):
    def scrape():
        response = requests.get(f"{base_url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
                                timeout=10)
        assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
        return samples(response.text)

    before = scrape()
    image = images.noise_png(81_001)
    first = requests.post(f"{base_url}/api/v1/jobs", files={"image": ("n.png", image, "image/png")}, timeout=30)
    assert first.status_code == 202
    model = first.json()["model"]["name"]
    wait_done(client, first.json()["id"])
    again = requests.post(f"{base_url}/api/v1/jobs", files={"image": ("n.png", image, "image/png")}, timeout=30)
    assert again.status_code == 200
    after = scrape()

    def moved(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved("imgsvc_jobs_submitted_total", model=model) == 2
    assert moved("imgsvc_cache_misses_total", model=model) == 1
    assert moved("imgsvc_cache_hits_total", model=model) == 1
    assert moved("imgsvc_jobs_completed_total", model=model) == 1
    assert moved("imgsvc_inference_seconds_count", model=model, device="cpu") == 1
    assert moved("imgsvc_end_to_end_seconds_count", model=model) == 1
    assert moved("imgsvc_batch_size_count", model=model) == 1
    assert ("imgsvc_queue_depth", (("queue", f"inference.{model}"),)) in after
    assert total(after, "imgsvc_worker_children") >= 1
