"""Device planning in the worker's main process: how many children, which device each, no CUDA touched."""
import subprocess
import sys

import pytest

from shared.settings import Settings, SettingsError
from worker.device_plan import DevicePlanError, device_for_child, plan_devices, visible_gpus


@pytest.mark.parametrize("spec, per_device, gpus, plan", [
    ("auto", 2, 0, ["cpu", "cpu"]),
    ("auto", 1, 2, ["cuda:0", "cuda:1"]),
    ("auto", 2, 2, ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]),
    ("cpu", 3, 4, ["cpu", "cpu", "cpu"]),
    ("0,2", 1, 4, ["cuda:0", "cuda:2"]),
    ("1", 2, 2, ["cuda:1", "cuda:1"]),
])
def test_plan_gives_each_child_a_device(spec, per_device, gpus, plan):
    assert plan_devices(spec, per_device, gpus) == plan


def test_a_gpu_the_host_lacks_is_named():
    with pytest.raises(DevicePlanError, match="names GPU 2 but this host shows 2"):
        plan_devices("0,2", 1, 2)


def test_children_added_later_wrap_around_the_plan():
    plan = ["cuda:0", "cuda:1"]
    assert [device_for_child(plan, i) for i in range(5)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]


@pytest.mark.parametrize("value, count", [("0,1", 2), ("", 0), ("-1", 0), ("3", 1), ("0,-1,1", 1),
                                          ("GPU-8f2a,GPU-77b1", 2)])
def test_cuda_visible_devices_is_counted_like_cuda_does(value, count):
    assert visible_gpus(value) == count


@pytest.mark.parametrize("raw, normalised", [("auto", "auto"), ("CPU", "cpu"), ("0, 1", "0,1"),
                                             ("cuda:1,cuda:3", "1,3")])
def test_worker_devices_setting(raw, normalised):
    settings = Settings.from_env({"WORKER_DEVICES": raw})
    assert settings.worker_devices == normalised
    assert Settings.from_env(settings.to_env()) == settings


@pytest.mark.parametrize("raw", ["gpu", "0,x", "cuda", "1,,2"])
def test_bad_worker_devices_are_refused(raw):
    with pytest.raises(SettingsError, match="WORKER_DEVICES"):
        Settings.from_env({"WORKER_DEVICES": raw})


def test_planning_devices_imports_no_torch():
    code = ("import sys; import worker.celery_app as w; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(len(w.device_plan))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "WORKER_DEVICES": "cpu", "WORKER_CONCURRENCY": "3"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"
