"""The `value:` section: defaults, the salt from the environment, every problem by key path."""

from __future__ import annotations

from typing import Any

import pytest

from meterproxy import config
from meterproxy.errors import ConfigError
from meterproxy.value.settings import ValueSettings

UPSTREAMS = [{"name": "u", "url": "http://127.0.0.1:1/v1"}]


def parse(value: Any, environ: dict[str, str] | None = None) -> ValueSettings:
    return config.parse({"upstreams": UPSTREAMS, "value": value}, environ or {}).value


def test_defaults_and_values() -> None:
    assert parse(None) == ValueSettings()
    found = parse(
        {
            "task_idle_s": 900,
            "outcome_grace_s": 30,
            "duplicate_window_s": 120,
            "salt": "env:SALT",
            "max_open_tasks": 5000,
            "user_aliases": {"u-1": " alice "},
            "success_score": 0.8,
        },
        {"SALT": "s" * 32},
    )
    assert (found.task_idle_s, found.outcome_grace_s, found.duplicate_window_s) == (900, 30, 120)
    assert (found.salt, found.max_open_tasks, found.success_score) == ("s" * 32, 5000, 0.8)
    assert found.user_aliases == {"u-1": "alice"}
    assert "s" * 32 not in repr(found)  # the salt never reaches a log line
    assert parse({"duplicate_window_s": 0}).duplicate_window_s == 0  # detection off


def test_every_problem_is_named_by_its_path() -> None:
    with pytest.raises(ConfigError) as caught:
        parse(
            {
                "task_idle_s": 0,
                "salt": "short",
                "user_aliases": {"u-1": ""},
                "success_score": 2,
                "max_open_tasks": 0,
                "window": 1,
            }
        )
    assert caught.value.problems == [
        "value.window: unknown key (expected one of: task_idle_s, outcome_grace_s, "
        "duplicate_window_s, salt, max_open_tasks, user_aliases, success_score)",
        "value.salt: expected at least 16 characters (or env:VARIABLE)",
        "value.user_aliases.u-1: expected a name, got ''",
        "value.success_score: expected a number from 0 to 1, got 2",
        "value.task_idle_s: expected a positive number, got 0",
        "value.max_open_tasks: expected an integer from 1 to 10000000, got 0",
    ]
    with pytest.raises(ConfigError) as missing:
        parse({"salt": "env:NOT_SET"})
    assert missing.value.problems == ["value.salt: environment variable NOT_SET is not set"]
