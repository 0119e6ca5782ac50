"""Settings that cannot work together are refused at start-up, each problem named with both variables,
their values and why (shared/settings.py), in the process itself and not only in a unit test."""
from __future__ import annotations

import subprocess
import sys

import pytest

from shared.settings import REPO_ROOT, Settings, SettingsError
from tools.stack import free_port


@pytest.mark.parametrize("env, names", [
    ({"HEARTBEAT_INTERVAL_S": "20"}, ("WORKER_TTL_S (20)", "HEARTBEAT_INTERVAL_S (20)")),
    ({"WORKER_TTL_S": "4", "HEARTBEAT_INTERVAL_S": "5"}, ("WORKER_TTL_S (4)", "HEARTBEAT_INTERVAL_S (5)")),
    ({"VISIBILITY_TIMEOUT_S": "180"}, ("VISIBILITY_TIMEOUT_S (180)", "JOB_TIME_LIMIT_S (180)")),
    ({"JOB_TIME_LIMIT_S": "900"}, ("VISIBILITY_TIMEOUT_S (600)", "JOB_TIME_LIMIT_S (900)")),
    ({"JOB_SOFT_TIME_LIMIT_S": "180"}, ("JOB_SOFT_TIME_LIMIT_S (180)", "JOB_TIME_LIMIT_S (180)")),
    ({"IDEMPOTENCY_LEASE_S": "86400"}, ("IDEMPOTENCY_LEASE_S (86400)", "IDEMPOTENCY_TTL_S (86400)")),
], ids=["ttl-equals-heartbeat", "ttl-below-heartbeat", "visibility-equals-limit", "limit-above-visibility",
        "soft-limit-equals-hard", "lease-equals-ttl"])
def test_settings_that_cannot_work_together_are_refused_naming_both(env, names):
    with pytest.raises(SettingsError) as refused:
        Settings.from_env(env)
    for name in names:
        assert name in str(refused.value)


def test_every_problem_is_named_at_once():
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"WORKER_TTL_S": "5", "HEARTBEAT_INTERVAL_S": "5", "VISIBILITY_TIMEOUT_S": "60"})
    assert "WORKER_TTL_S (5)" in str(refused.value) and "VISIBILITY_TIMEOUT_S (60)" in str(refused.value)


def test_the_defaults_and_the_test_stack_pass(settings):
    assert Settings.from_env({}) == Settings()
    assert Settings.from_env(settings.to_env()) == settings


def test_a_process_started_with_them_exits_with_the_message():
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
           "WORKER_TTL_S": "5", "HEARTBEAT_INTERVAL_S": "5"}
    started = subprocess.run([sys.executable, "-m", "celery", "-A", "webhooks.celery_app", "worker", "--pool=threads"],
                             cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert started.returncode != 0
    assert "WORKER_TTL_S (5) must be above HEARTBEAT_INTERVAL_S (5)" in started.stdout + started.stderr
