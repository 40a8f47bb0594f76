"""wrk, as the benchmarks drive it: one POST body read from a file, a bearer key, the summary
wrk prints parsed into numbers. Shared by overhead.py and scale.py.

A body that holds `__N__` is sent with a number there unique to each request (per wrk thread
and run): real traffic is not one request repeated, and a proxy that recognizes repeated
prompts (meterproxy's value meter flags them as waste and stores a row for each) would
otherwise be measured on a workload of nothing but duplicates.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

UNIQUE = "__N__"  # in a body: replaced by a number unique to each request
SCRIPT = """
local f = io.open(os.getenv("BENCH_BODY"), "rb")
local body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
local head, tail = body:match("^(.-)__N__(.*)$")
if head then
  -- a fresh range each run: runs a second apart overlap only past 100,000 requests a second
  local n = (os.time() % 100000) * 100000
  request = function()
    n = n + 1
    return wrk.format(nil, nil, nil, head .. (tid or 0) .. "-" .. n .. tail)
  end
else
  wrk.body = body
end
"""
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run(command: list[str], url: str, body_path: str | Path, key: str) -> dict[str, float]:
    """Run `command` (wrk and its options, perhaps behind taskset) with the script and `url`
    appended, and parse wrk's summary: rps, requests, p50_ms, p99_ms, errors (non-2xx/3xx)."""
    script = Path(tempfile.gettempdir()) / "meterproxy-bench.lua"
    script.write_text(SCRIPT)
    out = subprocess.run(
        [*command, "-s", str(script), url],
        capture_output=True,
        text=True,
        env={**os.environ, "BENCH_BODY": str(body_path), "BENCH_KEY": key},
        check=True,
    ).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    result["requests"] = float(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)\b", out)
        result[f"p{pct}_ms"] = float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = float(errors.group(1)) if errors else 0.0
    return result
