"""Feedback bodies in both shapes: what each field means, and every refusal naming its field."""

from __future__ import annotations

from typing import Any

import pytest

from meterproxy.errors import InvalidRequest
from meterproxy.intake import clean_text
from meterproxy.value.feedback import Feedback, parse
from meterproxy.value.tasks import Report


def read(body: dict[str, Any]) -> Feedback:
    return parse(body, 0.5, clean_text)


def refused(body: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        read(body)
    return caught.value


def test_meterproxy_shape() -> None:
    assert read({"task_id": "T", "success": True}) == Feedback("T", None, Report(True))
    found = read({"request_id": " mp-1 ", "success": False, "score": 1, "metric": "tests_passed"})
    assert found == Feedback(None, "mp-1", Report(False, 1.0, "tests_passed"), param="request_id")
    assert read({"task_id": "x" * 500, "success": True}).task_id == "x" * 128  # as intake cuts
    assert read({"task_id": "a\x00b", "success": True}).task_id == "a\ufffdb"


def test_tensorzero_shape() -> None:
    assert read({"metric_name": "ok", "episode_id": "E", "value": True}) == Feedback(
        "E", None, Report(True, None, "ok"), param="episode_id"
    )
    graded = read({"metric_name": "q", "inference_id": "I", "value": 0.5, "tags": {"a": "b"}})
    assert graded == Feedback(None, "I", Report(True, 0.5, "q"), param="inference_id")
    assert read({"metric_name": "q", "inference_id": "I", "value": 0.49}).report.success is False
    dry = read({"metric_name": "q", "episode_id": "E", "value": False, "dryrun": True})
    assert dry.dryrun and not dry.report.success
    assert parse({"metric_name": "q", "episode_id": "E", "value": 0.6}, 0.7, clean_text).report == (
        Report(False, 0.6, "q")
    )


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"success": True}, "task_id", "exactly one of `task_id`"),
        ({"task_id": "T", "request_id": "R", "success": True}, "task_id", "exactly one"),
        ({"task_id": "", "success": True}, "task_id", "non-empty string"),
        ({"task_id": 7, "success": True}, "task_id", "got int"),
        ({"task_id": "T"}, "success", "got null"),
        ({"task_id": "T", "success": "yes"}, "success", "a boolean"),
        ({"task_id": "T", "success": True, "score": 1.5}, "score", "from 0 to 1"),
        ({"task_id": "T", "success": True, "score": True}, "score", "a number"),
        ({"task_id": "T", "success": True, "metric": ""}, "metric", "non-empty"),
        ({"task_id": "T", "success": True, "value": 1}, "task_id", "TensorZero"),
        ({"task_id": "T", "success": True, "extra": 1}, "extra", "unknown field `extra`"),
        ({"episode_id": "E", "value": True}, "metric_name", "got null"),
        ({"metric_name": "demonstration", "episode_id": "E", "value": "x"}, "metric_name", "text"),
        (
            {"metric_name": "m", "episode_id": "E", "inference_id": "I", "value": True},
            "inference_id",
            "Both episode_id and inference_id cannot be provided",
        ),
        ({"metric_name": "m", "value": True}, "episode_id", "exactly one of `episode_id`"),
        ({"metric_name": "m", "episode_id": "E", "value": None}, "value", "a boolean or"),
        ({"metric_name": "m", "episode_id": "E", "value": float("nan")}, "value", "from 0 to 1"),
        ({"metric_name": "m", "episode_id": "E", "value": 1, "tags": {"a": 1}}, "tags", "strings"),
        ({"metric_name": "m", "episode_id": "E", "value": 1, "dryrun": "no"}, "dryrun", "boolean"),
        ({"metric_name": "m", "episode_id": "E", "value": 1, "success": True}, "success", "field"),
    ],
)
def test_refusals_name_the_field(body: dict[str, Any], param: str, says: str) -> None:
    error = refused(body)
    assert error.status == 400 and error.param == param and says in error.message
