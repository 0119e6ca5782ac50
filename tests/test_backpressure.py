"""Past MAX_QUEUE_DEPTH new work is refused with 503 + Retry-After; cache hits are still answered."""
import dataclasses
import shutil

import pytest

from shared.jobjson import GRADCAM_URL_SLOT
from shared.keys import Computation, OutputOptions, image_digest
from shared.tasks import inference_queue, priority_lists
from tests import images
from tests.conftest import submit

pytestmark = pytest.mark.integration


@pytest.fixture
def unserved_app(settings, cards_dir, tmp_path, redis_client):
    """An app whose extra card no worker consumes, so its queue only grows; depth limit 2."""
    from web import create_app

    for card in cards_dir.glob("*.toml"):
        shutil.copy(card, tmp_path)
    shutil.copytree(cards_dir / "weights", tmp_path / "weights")
    text = (cards_dir / "tiny-resnet18.toml").read_text().replace('name = "tiny-resnet18"', 'name = "unserved"')
    (tmp_path / "unserved.toml").write_text(text)
    app = create_app(dataclasses.replace(settings, model_cards_dir=tmp_path, max_queue_depth=2))
    yield app
    redis_client.delete(inference_queue("unserved"), *redis_client.scan_iter("*:unserved:*"))


def test_full_queue_refuses_new_work_but_answers_hits(unserved_app, redis_client):
    client = unserved_app.test_client()
    for seed in (1, 2):
        assert submit(client, images.noise_png(seed=7000 + seed), model="unserved").status_code == 202
    assert redis_client.llen(inference_queue("unserved")) == 2
    refused = submit(client, images.noise_png(seed=7003), model="unserved")
    assert refused.status_code == 503
    assert refused.get_json()["error"]["code"] == "overloaded"
    assert int(refused.headers["Retry-After"]) > 0

    data = images.noise_png(seed=7004)
    comp = Computation("unserved", "test-1", image_digest(data), OutputOptions())
    store = unserved_app.extensions["imgsvc"].store
    redis_client.set(comp.meta_key, '{"sha256": "s", "format": "PNG", "width": 64, "height": 48}', ex=60)
    store.finish(comp, {"predictions": [], "gradcam": {"class_index": 0, "url": GRADCAM_URL_SLOT}}, None)
    hit = submit(client, data, model="unserved")
    assert hit.status_code == 200 and hit.get_json()["cached"] is True


def test_work_waiting_at_any_priority_step_counts_towards_the_depth(unserved_app, redis_client):
    """The bulk lane's messages wait on the queue's step-5 list: they fill MAX_QUEUE_DEPTH too."""
    client = unserved_app.test_client()
    for seed in (1, 2):
        assert submit(client, images.noise_png(seed=7200 + seed), model="unserved", priority="bulk").status_code == 202
    lists = priority_lists(inference_queue("unserved"))
    assert [redis_client.llen(name) for name in lists] == [0] * 5 + [2] + [0] * 4
    refused = submit(client, images.noise_png(seed=7203), model="unserved")
    assert (refused.status_code, refused.get_json()["error"]["code"]) == (503, "overloaded")
    redis_client.delete(*lists)


def test_a_batch_is_refused_whole_when_the_queue_is_full(unserved_app, redis_client):
    import io

    client = unserved_app.test_client()
    for seed in (1, 2):
        assert submit(client, images.noise_png(seed=7100 + seed), model="unserved").status_code == 202
    batches_before = set(redis_client.scan_iter("batch:*"))
    form = {"image": [(io.BytesIO(images.noise_png(seed=7110 + i)), f"{i}.png") for i in range(3)],
            "model": "unserved"}
    refused = client.post("/api/v1/batches", data=form, content_type="multipart/form-data")
    assert (refused.status_code, refused.get_json()["error"]["code"]) == (503, "overloaded")
    assert set(redis_client.scan_iter("batch:*")) == batches_before  # nothing half-created
    assert redis_client.llen(inference_queue("unserved")) == 2
