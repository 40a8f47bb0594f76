"""`POST /v1/feedback` bodies, in meterproxy's shape or TensorZero's, read into one `Feedback`.

    meterproxy:  {"task_id" | "request_id": str, "success": bool, "score"?: 0..1, "metric"?: str}
    TensorZero:  {"metric_name": str, "episode_id" | "inference_id": str, "value": bool | number,
                  "tags"?: {str: str}, "dryrun"?: bool, "internal"?: bool}

TensorZero's episode is a task, its inference a request (the proxy's key, sent to clients as
`x-meterproxy-request-id`). A boolean value is the success; a number is the score, a success
when it reaches `value.success_score`. As in TensorZero's gateway, unknown fields are refused,
and so are both ids at once. Pure: errors are the proxy's, raised for the handler to render.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidType, InvalidValue
from .tasks import Report

OURS = ("task_id", "request_id", "success", "score", "metric")
TENSORZERO = ("metric_name", "episode_id", "inference_id", "value", "tags", "dryrun", "internal")
# TensorZero's reserved metric names carry text, not an outcome.
RESERVED_METRICS = ("comment", "demonstration")
MAX_METRIC_CHARS = 64
MAX_ID_CHARS = 128  # intake.MAX_TASK_ID_CHARS and the proxy's keys fit
Clean = Callable[[str, int], str]


@dataclass(frozen=True, slots=True)
class Feedback:
    task_id: str | None  # exactly one of task_id and request_id is set
    request_id: str | None
    report: Report
    dryrun: bool = False  # validated and resolved, not stored (TensorZero's `dryrun`)
    param: str = "task_id"  # the body field that named the task or request


def parse(body: dict[str, Any], success_score: float, clean: Clean) -> Feedback:
    """`clean(text, limit)` bounds and sanitizes ids and names as intake does for headers, so a
    task id reported here matches the one the x-meterproxy-task header stored."""
    tensorzero = any(k in body for k in ("metric_name", "episode_id", "inference_id", "value"))
    allowed = TENSORZERO if tensorzero else OURS
    for key in body:
        if key not in allowed:
            shape = "a TensorZero-shaped feedback body" if tensorzero else "a feedback body"
            raise InvalidValue(
                f"unknown field `{clean(str(key), 64)}` in {shape}; expected one of "
                f"{', '.join(allowed)}",
                param=clean(str(key), 64),
            )
    feedback = _tensorzero(body, success_score) if tensorzero else _ours(body)
    report = feedback.report
    metric = None if report.metric is None else clean(report.metric, MAX_METRIC_CHARS)
    return Feedback(
        None if feedback.task_id is None else clean(feedback.task_id, MAX_ID_CHARS),
        None if feedback.request_id is None else clean(feedback.request_id, MAX_ID_CHARS),
        Report(report.success, report.score, metric),
        feedback.dryrun,
        feedback.param,
    )


def _ours(body: dict[str, Any]) -> Feedback:
    task_id, request_id = _target(body, "task_id", "request_id")
    success = body.get("success")
    if not isinstance(success, bool):
        raise _type("success", "a boolean (true when the task reached its goal)", success)
    score = body.get("score")
    if score is not None:
        score = _score("score", score)
    metric = body.get("metric")
    if metric is not None and (not isinstance(metric, str) or not metric.strip()):
        raise _type("metric", "a non-empty string (e.g. tests_passed)", metric)
    param = "task_id" if task_id is not None else "request_id"
    return Feedback(task_id, request_id, Report(success, score, _metric(metric)), False, param)


def _tensorzero(body: dict[str, Any], success_score: float) -> Feedback:
    name = body.get("metric_name")
    if not isinstance(name, str) or not name.strip():
        raise _type("metric_name", "a non-empty string", name)
    if name in RESERVED_METRICS:
        raise InvalidValue(
            f"`{name}` feedback carries text, not an outcome; meterproxy stores boolean or "
            "numeric metrics (value: true/false, or a score from 0 to 1)",
            param="metric_name",
        )
    if "episode_id" in body and "inference_id" in body:
        raise InvalidValue(
            "Both episode_id and inference_id cannot be provided", param="inference_id"
        )
    task_id, request_id = _target(body, "episode_id", "inference_id")
    value = body.get("value")
    if isinstance(value, bool):
        report = Report(value, None, _metric(name))
    elif isinstance(value, (int, float)):
        score = _score("value", value)
        report = Report(score >= success_score, score, _metric(name))
    else:
        raise _type("value", "a boolean or a number from 0 to 1", value)
    tags = body.get("tags")
    if tags is not None and not (
        isinstance(tags, dict) and all(isinstance(v, str) for v in tags.values())
    ):
        raise _type("tags", "an object of strings", tags)
    dryrun = body.get("dryrun")
    if dryrun is not None and not isinstance(dryrun, bool):
        raise _type("dryrun", "a boolean", dryrun)
    internal = body.get("internal")
    if internal is not None and not isinstance(internal, bool):
        raise _type("internal", "a boolean", internal)
    param = "episode_id" if task_id is not None else "inference_id"
    return Feedback(task_id, request_id, report, dryrun is True, param)


def _target(
    body: dict[str, Any], task_field: str, request_field: str
) -> tuple[str | None, str | None]:
    task_id, request_id = body.get(task_field), body.get(request_field)
    if (task_id is None) == (request_id is None):
        raise InvalidValue(
            f"name exactly one of `{task_field}` (the x-meterproxy-task id) and "
            f"`{request_field}` (a request's x-meterproxy-request-id)",
            param=task_field,
        )
    name, value = (task_field, task_id) if task_id is not None else (request_field, request_id)
    if not isinstance(value, str) or not value.strip():
        raise _type(name, "a non-empty string", value)
    value = value.strip()
    return (value, None) if task_id is not None else (None, value)


def _score(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type(name, "a number from 0 to 1", value)
    if not math.isfinite(value) or not 0 <= value <= 1:
        raise InvalidValue(
            f"invalid value for `{name}`: expected a number from 0 to 1, got {value!r}",
            param=name,
        )
    return float(value)


def _metric(value: str | None) -> str | None:
    return None if value is None else value.strip()


def _type(name: str, expected: str, value: Any) -> InvalidType:
    got = (
        "a string" if isinstance(value, str) else "null" if value is None else type(value).__name__
    )
    return InvalidType(
        f"invalid type for `{name}`: expected {expected}, but got {got} instead", param=name
    )
