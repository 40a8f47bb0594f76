"""OpenMeter's event ingest (`POST /api/v1/events`), reproduced where a sender depends on it,
from its source (openmeter/ingest/httpdriver, openmeter/meter/parse.go and meter.go,
openmeter/dedupe) and its API schema:

- the Content-Type is compared verbatim against `application/json`,
  `application/cloudevents+json` and `application/cloudevents-batch+json` (a `; charset=`
  parameter is an unknown type); an unknown type or an invalid event is a 400 for the whole
  request; success is a 204 with no body;
- an event needs `specversion` "1.0" and non-empty `id`, `source`, `type` and `subject`;
  `datacontenttype`, when given, must be `application/json`; `time`, when given, RFC 3339;
- events are deduplicated by (source, id): a retried event is stored once;
- meters (the `meters:` list of OpenMeter's config.yaml) are evaluated as ParseEvent does:
  COUNT counts events; SUM/AVG/MIN/MAX need the `valueProperty` to be a number or a numeric
  string, and an event whose value is missing or null is invalid for that meter (not counted);
  group-by values missing from the data are "".

Faults, for senders' tests: `faults(n)` picks what happens to the n-th request (0-based):
`ok`; `fail` (a 500, nothing stored); `lost` (stored, then a 502: the sender cannot tell).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web

CONTENT_TYPES = (
    "application/json",
    "application/cloudevents+json",
    "application/cloudevents-batch+json",
)
AGGREGATIONS = ("SUM", "COUNT", "AVG", "MIN", "MAX", "UNIQUE_COUNT")
_GROUP_KEY = re.compile(r"^[a-zA-Z_][0-9a-zA-Z_]*$")
_PATH = re.compile(r"^\$(\.[A-Za-z_][0-9A-Za-z_]*)+$")
REQUIRED = ("id", "source", "type", "subject")


def validate_meter(meter: Mapping[str, Any]) -> list[str]:
    """OpenMeter's Meter.Validate, on one entry of a config's `meters:` list."""
    problems = []
    slug = meter.get("slug")
    if not slug:
        problems.append("meter key is required")
    if not meter.get("eventType"):
        problems.append(f"{slug}: meter event type is required")
    aggregation = meter.get("aggregation")
    if aggregation not in AGGREGATIONS:
        problems.append(f"{slug}: unknown aggregation {aggregation!r}")
    value = meter.get("valueProperty")
    if aggregation == "COUNT" and value is not None:
        problems.append(f"{slug}: value property is not allowed when the aggregation is count")
    if aggregation != "COUNT" and (not value or not str(value).startswith("$")):
        problems.append(f"{slug}: value property must start with $")
    for key, path in (meter.get("groupBy") or {}).items():
        if not str(path).startswith("$"):
            problems.append(f"{slug}: group by value must start with $ for key {key}")
        if not _GROUP_KEY.match(str(key)):
            problems.append(f"{slug}: group by key {key} is invalid")
        if value is not None and path == value:
            problems.append(f"{slug}: group by value {key} cannot be the same as value property")
    return problems


def lookup(data: Any, path: str) -> tuple[bool, Any]:
    """`$.a.b` in `data`: (found, value). Only the plain dotted form; anything else raises."""
    if not _PATH.match(path):
        raise ValueError(f"the fake OpenMeter reads only $.a.b paths, not {path!r}")
    for part in path[2:].split("."):
        if not isinstance(data, dict) or part not in data:
            return False, None
        data = data[part]
    return True, data


def parse_value(meter: Mapping[str, Any], data: Any) -> float | None:
    """ParseEvent: the event's value for a meter, or None when it is invalid for it."""
    if meter["aggregation"] == "COUNT":
        return 1.0
    if data is None:
        return None
    found, raw = lookup(data, meter["valueProperty"])
    if not found or raw is None:
        return None
    if isinstance(raw, bool):
        return None
    if isinstance(raw, str):
        try:
            return float(raw)
        except ValueError:
            return None
    return float(raw) if isinstance(raw, (int, float)) else None


def _invalid(event: Any) -> str | None:
    if not isinstance(event, dict):
        return "an event must be a JSON object"
    if event.get("specversion") != "1.0":
        return "specversion must be 1.0"
    for name in REQUIRED:
        if not isinstance(event.get(name), str) or not event[name]:
            return f"{name}: must be a non-empty string"
    kind = event.get("datacontenttype")
    if kind is not None and kind != "application/json":
        return "datacontenttype: only application/json is allowed"
    when = event.get("time")
    if when is not None:
        try:
            datetime.fromisoformat(str(when).replace("Z", "+00:00"))
        except ValueError:
            return f"time: not RFC 3339: {when!r}"
    return None


@dataclass
class FakeOpenMeter:
    meters: list[dict[str, Any]] = field(default_factory=list)
    faults: Callable[[int], str] = lambda n: "ok"
    events: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # deduplicated
    received: list[dict[str, Any]] = field(default_factory=list)  # every stored copy
    statuses: list[int] = field(default_factory=list)  # one per request, in order
    content_types: list[str] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/v1/events", self._ingest)
        return app

    async def _ingest(self, request: web.Request) -> web.Response:
        n = len(self.statuses)
        fault = self.faults(n)
        kind = request.headers.get("Content-Type", "")
        self.content_types.append(kind)
        self.authorizations.append(request.headers.get("Authorization", ""))
        status, body = self._accept(kind, await request.read(), store=fault != "fail")
        if status == 204 and fault == "fail":
            status = 500
        elif status == 204 and fault == "lost":
            status = 502
        self.statuses.append(status)
        if status == 204:
            return web.Response(status=204)
        return web.json_response({"title": body or "fault injected"}, status=status)

    def _accept(self, kind: str, raw: bytes, *, store: bool) -> tuple[int, str]:
        if kind not in CONTENT_TYPES:
            return 400, f"invalid content type: {kind}"
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return 400, f"invalid event: {exc}"
        batch = parsed if isinstance(parsed, list) else [parsed]
        if kind == "application/cloudevents-batch+json" and not isinstance(parsed, list):
            return 400, "invalid event: a batch must be an array"
        if not batch:
            return 400, "invalid event: no events found"
        for event in batch:
            problem = _invalid(event)
            if problem:
                return 400, f"invalid event: {problem}"
        if store:
            for event in batch:
                self.received.append(event)
                self.events.setdefault((event["source"], event["id"]), event)
        return 204, ""

    def meter(self, slug: str, **group: str) -> float:
        """A SUM or COUNT meter's total over every stored event, optionally one group's."""
        meter = next(m for m in self.meters if m["slug"] == slug)
        total = 0.0
        for event in self.events.values():
            if event["type"] != meter["eventType"]:
                continue
            data = event.get("data")
            groups = {k: _group(data, p) for k, p in (meter.get("groupBy") or {}).items()}
            if any(groups.get(k) != v for k, v in group.items()):
                continue
            value = parse_value(meter, data)
            if value is not None and math.isfinite(value):
                total += value
        return total

    def invalid_for(self, slug: str) -> int:
        """Events of the meter's type that it cannot count (OpenMeter lists them as invalid)."""
        meter = next(m for m in self.meters if m["slug"] == slug)
        return sum(
            1
            for e in self.events.values()
            if e["type"] == meter["eventType"] and parse_value(meter, e.get("data")) is None
        )


def _group(data: Any, path: str) -> str:
    found, value = lookup(data, path)
    if not found:
        return ""
    return "<nil>" if value is None else str(value)  # Go's fmt.Sprintf("%v", nil)
