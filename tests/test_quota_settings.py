"""The quota store's settings: defaults, every key validated by its path, failure modes per
limit class, and `server.workers`."""

from __future__ import annotations

import pytest

from meterproxy import config
from meterproxy.errors import ConfigError
from meterproxy.policy import Limits
from meterproxy.quota_settings import QuotaBackendSettings

UPSTREAMS = [{"name": "u", "url": "http://u/v1"}]


def parse(**quota: object) -> config.Settings:
    return config.parse({"upstreams": UPSTREAMS, "quota": quota}, {})


def test_defaults_are_the_single_process_store() -> None:
    settings = parse()
    assert settings.quota == QuotaBackendSettings()
    assert settings.quota.backend == "local" and settings.server.workers == 1


def test_redis_with_per_class_failure_modes() -> None:
    settings = config.parse(
        {
            "upstreams": UPSTREAMS,
            "server": {"workers": 4},
            "quota": {
                "timezone": "Europe/Paris",
                "backend": "redis",
                "redis_url": "redis://:s3cret@cache.internal:6380/2",
                "on_backend_error": {"rate": "open", "budget": "closed"},
                "timeout_s": 0.05,
                "reservation_ttl_s": 20,
            },
        },
        {},
    )
    quota = settings.quota
    assert (quota.backend, quota.timeout_s, quota.reservation_ttl_s) == ("redis", 0.05, 20.0)
    assert settings.tenancy.timezone == "Europe/Paris" and settings.server.workers == 4
    assert quota.redis_location == "cache.internal:6380/2"  # never the password
    assert not quota.fails_closed(Limits(requests_per_minute=10, max_concurrent=2))
    assert quota.fails_closed(Limits(requests_per_minute=10, tokens_per_day=100))
    assert not QuotaBackendSettings(on_error_rate="open", on_error_budget="open").fails_closed(
        Limits(tokens_per_day=1)
    )


def test_every_problem_is_named_by_its_path() -> None:
    with pytest.raises(ConfigError) as caught:
        config.parse(
            {
                "upstreams": UPSTREAMS,
                "server": {"workers": 0},
                "quota": {
                    "backend": "memcached",
                    "redis_url": "http://x",
                    "on_backend_error": {"rate": "maybe", "budgets": "open"},
                    "timeout_s": 30,
                    "reservation_ttl_s": 0.5,
                    "redis_db": 1,
                },
            },
            {},
        )
    assert caught.value.problems == [
        "server.workers: expected an integer from 1 to 256, got 0",
        "quota.redis_db: unknown key (expected one of: timezone, state_path, "
        "output_reservation, backend, redis_url, redis_prefix, timeout_s, reservation_ttl_s, "
        "drift_check_s, on_backend_error)",
        "quota.backend: expected local or redis, got 'memcached'",
        "quota.redis_url: expected redis://host:port/db (or rediss://, unix://), got 'http://x'",
        "quota.on_backend_error.budgets: unknown key (expected one of: rate, budget)",
        "quota.on_backend_error.rate: expected closed or open, got 'maybe'",
        "quota.timeout_s: at most 10 s (every admission waits this long), got 30.0",
        "quota.reservation_ttl_s: at least 1 s (reservations are refreshed at a third of it)",
    ]
    with pytest.raises(ConfigError, match="on_backend_error: expected closed, open or"):
        parse(on_backend_error="sometimes")
