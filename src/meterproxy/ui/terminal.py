"""A compact live summary for a terminal, from the same view the status page draws."""

from __future__ import annotations

import time

from .view import View


def summary(view: View) -> str:
    """A few lines: throughput and efficiency over the last minute, then each tenant's spend
    and wasted share over the history window."""
    r = view["recent"]
    clock = time.strftime("%H:%M:%S", time.localtime(view["generated_at"]))
    head = " · ".join(
        (
            f"{number(r['tokens_per_s'], 0)} tokens/s",
            f"{number(r['tokens_per_joule'], 2)} tokens/J",
            f"{money(r['usd_per_million_tokens'])} per M tokens",
            f"GPU {number(r['power_w'], 0)} W",
        )
    )
    lines = [f"{clock}  {head}  (last {r['window_s']:.0f} s)"]
    width = max((len(t["tenant"]) for t in view["tenants"]), default=0)
    for t in view["tenants"]:
        parts = [f"{money(t['cost_usd'])} spent", f"{percent(t['waste_share'])} wasted"]
        wasted, share = sum(t["waste"].values()), t["waste_share"]
        reasons = [  # each reason's part of the wasted share
            f"{reason} {percent(share * tokens / wasted if share is not None else None)}"
            for reason, tokens in sorted(t["waste"].items(), key=lambda kv: -kv[1])
            if tokens
        ]
        if reasons:
            parts[-1] += f" ({', '.join(reasons)})"
        refused = sum(t["rejections"].values())
        if refused:
            parts.append(f"{refused:,.0f} refused ({', '.join(sorted(t['rejections']))})")
        lines.append(f"  {t['tenant']:<{width}}  " + " · ".join(parts))
    return "\n".join(lines)


def number(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def money(x: float | None) -> str:
    if x is None:
        return "$-"
    return f"${x:,.2f}" if abs(x) >= 1 else f"${x:.4f}"


def percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"
