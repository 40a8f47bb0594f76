"""What a request cost: hosted models by a price table, local upstreams by GPU time plus
electricity. A model with no price costs 0 and says so (`priced=False`); nothing is guessed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, NamedTuple

import yaml

if TYPE_CHECKING:
    from .config import Settings
    from .exchange import Exchange


PER_MILLION = 1_000_000
JOULES_PER_KWH = 3_600_000


@dataclass(frozen=True)
class ModelPrice:
    """USD per million tokens."""

    input: float
    cached_input: float
    output: float


@dataclass(frozen=True)
class UpstreamPrice:
    gpu_hour_usd: float
    electricity_usd_per_kwh: float = 0.0


@dataclass(frozen=True)
class PriceTable:
    models: Mapping[str, ModelPrice]
    upstreams: Mapping[str, UpstreamPrice]
    taken: str = ""
    source: str = ""


class Cost(NamedTuple):
    """One request's cost (a named tuple: one is made per request)."""

    usd: float
    priced: bool


UNPRICED = Cost(0.0, False)


def hosted_cost(price: ModelPrice, prompt: int, cached: int, completion: int) -> float:
    """Prompt tokens include cached ones; reasoning tokens are part of completion tokens."""
    uncached = max(prompt - cached, 0)
    return (
        uncached * price.input + cached * price.cached_input + completion * price.output
    ) / PER_MILLION


def local_cost(price: UpstreamPrice, gpu_seconds: float, gpus: int, energy_j: float) -> float:
    return (
        gpu_seconds * price.gpu_hour_usd / 3600 * max(gpus, 1)
        + energy_j / JOULES_PER_KWH * price.electricity_usd_per_kwh
    )


def cost_of(
    table: PriceTable,
    *,
    model: str,
    upstream: str,
    gpus: int,
    prompt: int,
    cached: int,
    completion: int,
    gpu_seconds: float,
    energy_j: float,
) -> Cost:
    local = table.upstreams.get(upstream)
    if local is not None:
        return Cost(local_cost(local, gpu_seconds, gpus, energy_j), True)
    hosted = table.models.get(model)
    if hosted is not None:
        return Cost(hosted_cost(hosted, prompt, cached, completion), True)
    return UNPRICED


def default_table() -> PriceTable:
    """The price table shipped in the package (data/prices.yaml)."""
    text = resources.files("meterproxy").joinpath("data/prices.yaml").read_text("utf-8")
    tree: dict[str, Any] = yaml.safe_load(text)
    models = {
        name: ModelPrice(float(p["input"]), float(p["cached_input"]), float(p["output"]))
        for name, p in tree["models"].items()
    }
    return PriceTable(
        models=models, upstreams={}, taken=str(tree["taken"]), source=str(tree["source"])
    )


def price(settings: Settings, ex: Exchange) -> Cost:
    """What an exchange that reached its upstream cost, by the current price table."""
    upstream, gpus = ex.upstream, 0
    for u in settings.upstreams:  # a loop, not a generator: once per request
        if u.name == upstream:
            gpus = len(u.gpus)
            break
    usage = ex.usage
    return cost_of(
        settings.prices,
        model=ex.model,
        upstream=upstream,
        gpus=gpus,
        prompt=usage.prompt or 0,
        cached=usage.cached_prompt or 0,
        completion=usage.completion or 0,
        gpu_seconds=ex.gpu_seconds,
        energy_j=ex.energy_j or 0.0,
    )
