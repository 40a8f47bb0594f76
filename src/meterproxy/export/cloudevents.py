"""CloudEvents 1.0 in the JSON event format (structured mode): one event per settled request.

`id` is the proxy's request key and `source` a configured constant, so (source, id) names one
request everywhere and a receiver that deduplicates (OpenMeter does, by source and id) counts a
retried event once. `subject` is the tenant; `data` is the ledger row as stored (bounded text;
no key, no prompt, no completion; the client's `user` only as the ledger keeps it).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

import orjson

from ..ledger import COLUMNS
from ..store.schema import Row

SPECVERSION = "1.0"
# Exactly this, with no charset parameter: OpenMeter compares the header verbatim.
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
DATA_CONTENT_TYPE = "application/json"


def rfc3339(ts: float) -> str:
    moment = datetime.fromtimestamp(ts, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event(row: Row, *, source: str, type_: str) -> dict[str, object]:
    data = dict(zip(COLUMNS, row, strict=True))
    data["priced"] = bool(data["priced"])
    out: dict[str, object] = {
        "specversion": SPECVERSION,
        "id": data["request_id"],
        "source": source,
        "type": type_,
        "subject": data["tenant"],
    }
    ts = data["ts"]
    if isinstance(ts, float):
        out["time"] = rfc3339(ts)
    out["datacontenttype"] = DATA_CONTENT_TYPE
    out["data"] = data
    return out


def batch(rows: Sequence[Row], *, source: str, type_: str) -> bytes:
    """The JSON batch format: an array of events."""
    return orjson.dumps([event(r, source=source, type_=type_) for r in rows])
