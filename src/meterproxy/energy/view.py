"""`meterproxy energy`: each GPU's energy model as the running proxy has fitted it (idle and
engine-floor power, joules per step and per token), whether attribution trusts it yet, and how
well it predicts, read from the proxy's /metrics. Parsing is pure; `main` does the one fetch."""

from __future__ import annotations

import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from .calibration import TERMS

_SAMPLE = re.compile(r"^(meterproxy_gpu_[a-z_]+)\{([^}]*)\}\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
HEADINGS = {
    "idle_w": "idle W",
    "floor_w": "floor W",
    "step_j": "J/step",
    "prefill_j": "J/prefill token",
    "decode_j": "J/decoded token",
    "context_j": "J/token/1k context",
}


@dataclass
class GpuView:
    terms: dict[str, float] = field(default_factory=dict)
    trusted: bool = False
    in_use: bool = False
    error_ratio: float | None = None
    windows: float = 0.0
    power_w: float | None = None
    measured_j: float = 0.0
    idle_j: float = 0.0


def parse(text: str) -> dict[str, GpuView]:
    """GPU -> what /metrics says of its energy (the `meterproxy_gpu_*` families)."""
    gpus: dict[str, GpuView] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group(2)))
        gpu = labels.get("gpu")
        if gpu is None:
            continue
        view = gpus.setdefault(gpu, GpuView())
        name, value = m.group(1), float(m.group(3))
        if name == "meterproxy_gpu_energy_model" and labels.get("term") in TERMS:
            view.terms[labels["term"]] = value
        elif name == "meterproxy_gpu_energy_model_trusted":
            view.trusted = value == 1.0
        elif name == "meterproxy_gpu_energy_model_in_use":
            view.in_use = value == 1.0
        elif name == "meterproxy_gpu_energy_model_error_ratio":
            view.error_ratio = value
        elif name == "meterproxy_gpu_energy_model_windows":
            view.windows = value
        elif name == "meterproxy_gpu_power_watts":
            view.power_w = value
        elif name == "meterproxy_gpu_energy_joules_total":
            view.measured_j = value
        elif name == "meterproxy_gpu_idle_energy_joules_total":
            view.idle_j = value
    return gpus


def render(gpus: dict[str, GpuView]) -> str:
    if not gpus:
        return "no GPU energy metrics: is an energy source configured (energy.source)?\n"
    head = ["GPU", "attribution uses", *HEADINGS.values(), "fit error", "windows", "power W"]
    rows = [head]
    for gpu, v in sorted(gpus.items()):
        if v.in_use:
            uses = "the fit" if v.trusted else "the fit (young)"
        else:
            uses = "defaults (fitting)" if v.terms else "defaults"
        terms = [f"{v.terms[t]:.4g}" if t in v.terms else "-" for t in HEADINGS]
        error = "-" if v.error_ratio is None else f"{v.error_ratio:.1%}"
        power = "-" if v.power_w is None else f"{v.power_w:.0f}"
        rows.append([gpu, uses, *terms, error, f"{v.windows:.0f}", power])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append("")
    for gpu, v in sorted(gpus.items()):
        busy = v.measured_j - v.idle_j
        lines.append(
            f"GPU {gpu}: {v.measured_j:.0f} J measured, {busy:.0f} J attributed to requests, "
            f"{v.idle_j:.0f} J idle"
        )
    lines.append(
        "Attribution uses a GPU's fit from its first busy window (~1 s), starting from the "
        "configured defaults; young until 10 busy windows are predicted within 15 %, and set "
        "aside for the defaults if it predicts worse than that."
    )
    return "\n".join(lines) + "\n"


def main(url: str, timeout_s: float = 5.0) -> int:
    """Print the energy view of the proxy at `url` (its base URL); 1 if it cannot be read."""
    target = url.rstrip("/") + "/metrics"
    try:
        with urllib.request.urlopen(target, timeout=timeout_s) as response:
            text = response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"error: cannot read {target}: {exc} (is the proxy running there?)", file=sys.stderr)
        return 1
    sys.stdout.write(render(parse(text)))
    return 0
