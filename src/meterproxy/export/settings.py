"""The `export:` section of the config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..validation import Checker


@dataclass(frozen=True)
class CloudEvents:
    """Off while `url` is None."""

    url: str | None = None  # the ingest endpoint, e.g. OpenMeter's .../api/v1/events
    source: str = "meterproxy"  # CloudEvents `source`; (source, id) is unique per request
    type: str = "meterproxy.request"
    api_key: str | None = field(default=None, repr=False)  # sent as `Authorization: Bearer`
    batch_events: int = 100
    interval_s: float = 1.0
    max_queue_events: int = 100_000
    timeout_s: float = 10.0
    retry_max_s: float = 60.0
    # Events the receiver has not taken when the queue is full or the proxy stops wait here.
    spill_path: str = "meterproxy-export-spill.db"  # relative: in the state directory


@dataclass(frozen=True)
class Export:
    cloudevents: CloudEvents = CloudEvents()


def parse_export(check: Checker, value: Any, environ: Mapping[str, str]) -> Export:
    tree = check.mapping(value, "export", ("cloudevents",))
    p = "export.cloudevents"
    ce = check.mapping(
        tree.get("cloudevents"),
        p,
        (
            "url",
            "source",
            "type",
            "api_key_env",
            "batch_events",
            "interval_s",
            "max_queue_events",
            "timeout_s",
            "retry_max_s",
            "spill_path",
        ),
    )
    d = CloudEvents()
    url = check.string(ce.get("url"), f"{p}.url")
    if url is not None and not url.startswith(("http://", "https://")):
        check.fail(
            f"{p}.url",
            "expected the ingest endpoint's http:// or https:// URL "
            f"(OpenMeter: http://openmeter:8888/api/v1/events), got {url!r}",
        )
    key_env = check.string(ce.get("api_key_env"), f"{p}.api_key_env")
    api_key = None
    if key_env is not None:
        api_key = environ.get(key_env)
        if not api_key:
            check.fail(
                f"{p}.api_key_env",
                f"environment variable {key_env} is not set; export it with the ingest token",
            )
    return Export(
        CloudEvents(
            url=url,
            source=check.string(ce.get("source"), f"{p}.source", d.source) or d.source,
            type=check.string(ce.get("type"), f"{p}.type", d.type) or d.type,
            api_key=api_key,
            batch_events=check.integer(
                ce.get("batch_events"), f"{p}.batch_events", d.batch_events, 1, 10_000
            ),
            interval_s=check.positive(ce.get("interval_s"), f"{p}.interval_s", d.interval_s),
            max_queue_events=check.integer(
                ce.get("max_queue_events"), f"{p}.max_queue_events", d.max_queue_events, 1, 10**8
            ),
            timeout_s=check.positive(ce.get("timeout_s"), f"{p}.timeout_s", d.timeout_s),
            retry_max_s=check.positive(ce.get("retry_max_s"), f"{p}.retry_max_s", d.retry_max_s),
            spill_path=check.string(ce.get("spill_path"), f"{p}.spill_path") or d.spill_path,
        )
    )
