"""The `energy:` section of the config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..validation import Checker, show
from .attribution import Weights
from .simulated import SimulatedGpuSpec

SOURCES = ("auto", "nvml", "dcgm", "simulated", "none")


@dataclass(frozen=True)
class EnergySettings:
    source: str = "auto"  # auto: nvml when a GPU is visible, else none
    interval_s: float = 0.1
    dcgm_url: str | None = None
    weights: Weights = field(default_factory=Weights)
    simulated: SimulatedGpuSpec = field(default_factory=SimulatedGpuSpec)


def parse_energy(check: Checker, value: Any) -> EnergySettings:
    tree = check.mapping(
        value, "energy", ("source", "interval_s", "dcgm_url", "weights", "simulated")
    )
    source = tree.get("source", "auto")
    if source not in SOURCES:
        check.fail("energy.source", f"expected one of {', '.join(SOURCES)}, got {show(source)}")
        source = "none"
    interval = check.positive(tree.get("interval_s"), "energy.interval_s", 0.1)
    if interval < 0.1:
        check.fail(
            "energy.interval_s",
            f"expected at least 0.1 (NVML is polled at most 10 Hz per GPU), got {interval}",
        )
    url = check.string(tree.get("dcgm_url"), "energy.dcgm_url")
    if source == "dcgm" and url is None:
        check.fail(
            "energy.dcgm_url", "required with source: dcgm (e.g. http://gpu-node:9400/metrics)"
        )
    w = check.mapping(
        tree.get("weights"), "energy.weights", ("prefill", "decode", "prefill_s_per_token")
    )
    d = Weights()
    weights = Weights(
        prefill=check.positive(w.get("prefill"), "energy.weights.prefill", d.prefill),
        decode=check.positive(w.get("decode"), "energy.weights.decode", d.decode),
        prefill_s_per_token=check.positive(
            w.get("prefill_s_per_token"),
            "energy.weights.prefill_s_per_token",
            d.prefill_s_per_token,
        ),
    )
    sim_keys = (
        "idle_w",
        "busy_w",
        "token_mj",
        "prefill_mj",
        "board_w",
        "step_ms",
        "gain",
        "reset_every_s",
    )
    t = check.mapping(tree.get("simulated"), "energy.simulated", sim_keys)
    sd = SimulatedGpuSpec()
    reset = t.get("reset_every_s")
    simulated = SimulatedGpuSpec(
        idle_w=check.positive(t.get("idle_w"), "energy.simulated.idle_w", sd.idle_w),
        busy_w=check.positive(t.get("busy_w"), "energy.simulated.busy_w", sd.busy_w),
        token_mj=check.positive(t.get("token_mj"), "energy.simulated.token_mj", sd.token_mj),
        prefill_mj=check.positive(
            t.get("prefill_mj"), "energy.simulated.prefill_mj", sd.prefill_mj
        ),
        board_w=check.positive(t.get("board_w"), "energy.simulated.board_w", sd.board_w),
        step_ms=int(check.positive(t.get("step_ms"), "energy.simulated.step_ms", 1))
        if t.get("step_ms")
        else 0,
        gain=check.positive(t.get("gain"), "energy.simulated.gain", sd.gain),
        reset_every_s=check.positive(reset, "energy.simulated.reset_every_s", 60.0)
        if reset is not None
        else None,
    )
    return EnergySettings(
        source=str(source), interval_s=interval, dcgm_url=url, weights=weights, simulated=simulated
    )
