"""The web tier as deployed: gunicorn on a free port, real HTTP, real size cap."""
import subprocess
import sys
import time

import pytest
import requests

from shared.settings import REPO_ROOT
from tests import images
from tools.stack import service_env

pytestmark = pytest.mark.integration


def test_upload_over_http_then_cache_hit(base_url):
    data = images.encode(images.coffee(), "JPEG", quality=90)
    first = requests.post(f"{base_url}/api/v1/jobs", files={"image": ("coffee.jpg", data)}, timeout=30)
    assert first.status_code in (200, 202)
    job_url = base_url + first.headers["Location"]
    deadline = time.monotonic() + 120
    while (job := requests.get(job_url, timeout=10).json())["status"] not in ("done", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert job["status"] == "done"
    assert job["result"]["predictions"][0]["label"] in {"espresso", "cup", "coffee mug"}
    again = requests.post(f"{base_url}/api/v1/jobs", files={"image": ("c.jpg", data)}, timeout=30)
    assert again.status_code == 200 and again.json()["cached"] is True


def test_oversized_upload_is_413_json(base_url):
    big = b"\xff\xd8\xff" + b"\x00" * (21 * 1024 * 1024)
    answer = requests.post(f"{base_url}/api/v1/jobs", files={"image": ("big.jpg", big)}, timeout=60)
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "payload_too_large"


def test_readyz_over_http(base_url):
    assert requests.get(f"{base_url}/readyz", timeout=5).status_code == 200


def test_web_tier_never_imports_torch(settings):
    code = ("import sys, web; web.create_app(); "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=service_env(settings),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
