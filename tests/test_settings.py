import base64

import pytest

from shared.settings import Settings, SettingsError


def test_defaults_suit_a_laptop():
    settings = Settings.from_env({})
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.max_upload_bytes == 20 * 1024 * 1024
    assert settings.result_ttl_s == 7 * 24 * 3600
    assert settings.worker_devices == "auto"
    assert settings.admin_token == "" and settings.worker_metrics_port == 9808
    assert settings.metrics_token == "" and settings.worker_metrics_bind == "127.0.0.1"


def test_environment_overrides():
    settings = Settings.from_env({"REDIS_URL": "redis://h:1/2", "MAX_UPLOAD_MB": "5", "MODELS": "a, b",
                                  "AMP_DTYPE": "BFLOAT16", "RESULT_TTL_S": "60"})
    assert settings.redis_url == "redis://h:1/2"
    assert settings.max_upload_bytes == 5 * 1024 * 1024
    assert settings.models == ("a", "b")
    assert settings.amp_dtype == "bfloat16"
    assert settings.result_ttl_s == 60


@pytest.mark.parametrize("env, fragment", [
    ({"MAX_UPLOAD_MB": "lots"}, "MAX_UPLOAD_MB must be a whole number"),
    ({"MAX_UPLOAD_MB": "0"}, "at least 1"),
    ({"AMP_DTYPE": "int8"}, "AMP_DTYPE must be one of"),
    ({"WORKER_METRICS_BIND": "everywhere"}, "WORKER_METRICS_BIND must be an IP address"),
    ({"METRICS_TOKEN": "short"}, "METRICS_TOKEN must be at least 32 characters"),
    ({"MAX_WAITERS": "-1"}, "MAX_WAITERS must be at least 0"),
    ({"IDEMPOTENCY_LEASE_S": "0"}, "IDEMPOTENCY_LEASE_S must be at least 1"),
    ({"CALLBACK_RESOLVE_TIMEOUT_S": "0"}, "CALLBACK_RESOLVE_TIMEOUT_S must be above 0"),
])
def test_bad_values_are_named(env, fragment):
    with pytest.raises(SettingsError, match=fragment):
        Settings.from_env(env)


def test_celery_reads_one_visibility_timeout_everywhere():
    from shared.tasks import celery_config

    config = celery_config(Settings(visibility_timeout_s=123))
    assert config["broker_transport_options"]["visibility_timeout"] == 123
    assert config["result_backend_transport_options"]["visibility_timeout"] == 123
    assert config["visibility_timeout"] == 123
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1


def test_settings_survive_the_trip_through_the_environment(tmp_path):
    settings = Settings(redis_url="redis://h:2/3", model_cards_dir=tmp_path, models=("a", "b"),
                        max_upload_bytes=7 * 1024 * 1024, stuck_after_s=4, max_batch=3, amp_dtype="bfloat16",
                        max_waiters=0, idempotency_lease_s=5, callback_resolve_timeout_s=0.5)
    assert Settings.from_env(settings.to_env()) == settings


@pytest.mark.parametrize("secret", ["whsec_", "whsec_not base64!", "whsec_c2hvcnQ=", "dGVzdC13ZWJob29rLXNlY3JldC0zMi1ieXRlcyEhISE=",
                                    "whsec_" + "QUFB" * 30])
def test_a_webhook_secret_that_is_not_whsec_base64_is_refused_at_start_up(secret):
    with pytest.raises(SettingsError, match="WEBHOOK_SECRET"):
        Settings.from_env({"WEBHOOK_SECRET": secret})


def test_a_standard_webhooks_secret_is_accepted():
    secret = "whsec_" + base64.b64encode(bytes(range(32))).decode()
    assert Settings.from_env({"WEBHOOK_SECRET": secret}).webhook_secret == secret
