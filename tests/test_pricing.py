"""Cost formulas against hand-computed figures; the shipped table; config overrides."""

from __future__ import annotations

import pytest

from meterproxy import config
from meterproxy.errors import ConfigError
from meterproxy.occupancy import Occupancy
from meterproxy.pricing import (
    ModelPrice,
    PriceTable,
    UpstreamPrice,
    cost_of,
    default_table,
    hosted_cost,
    local_cost,
)


def test_hosted_cost_bills_cached_prompt_tokens_at_the_cached_price() -> None:
    price = ModelPrice(input=0.15, cached_input=0.075, output=0.60)
    # 1,000 prompt tokens of which 400 cached, 500 completion (reasoning included):
    # 600 x 0.15 + 400 x 0.075 + 500 x 0.60 = 90 + 30 + 300 = 420 USD per million -> 0.00042
    assert hosted_cost(price, prompt=1000, cached=400, completion=500) == pytest.approx(0.00042)


def test_local_cost_is_gpu_time_plus_electricity() -> None:
    price = UpstreamPrice(gpu_hour_usd=2.50, electricity_usd_per_kwh=0.12)
    # 36 GPU-seconds on 2 GPUs at 2.50/h = 0.05; 360 kJ = 0.1 kWh at 0.12 = 0.012
    assert local_cost(price, gpu_seconds=36, gpus=2, energy_j=360_000) == pytest.approx(0.062)


def test_an_unknown_model_is_unpriced_never_guessed() -> None:
    table = PriceTable(models={"a": ModelPrice(1, 1, 1)}, upstreams={})
    cost = cost_of(
        table,
        model="b",
        upstream="u",
        gpus=0,
        prompt=10,
        cached=0,
        completion=10,
        gpu_seconds=1.0,
        energy_j=0,
    )
    assert (cost.usd, cost.priced) == (0.0, False)


def test_the_shipped_table_loads_with_its_date_and_source() -> None:
    table = default_table()
    assert table.taken and table.source.startswith("https://")
    assert table.models["gpt-4o-mini"] == ModelPrice(0.15, 0.075, 0.60)
    assert all(p.cached_input <= p.input for p in table.models.values())


def test_config_overrides_and_extends_prices() -> None:
    settings = config.parse(
        {
            "upstreams": [{"name": "local-vllm", "url": "http://x/v1"}],
            "pricing": {
                "models": {
                    "gpt-4o-mini": {"input": 0.2, "output": 0.8},
                    "my-model": {"input": 1, "cached_input": 0.5, "output": 2},
                },
                "upstreams": {"local-vllm": {"gpu_hour_usd": 2.5, "electricity_usd_per_kwh": 0.12}},
            },
        },
        {},
    )
    prices = settings.prices
    assert prices.models["gpt-4o-mini"] == ModelPrice(0.2, 0.2, 0.8)
    assert prices.models["my-model"] == ModelPrice(1, 0.5, 2)
    assert prices.models["gpt-4o"] == default_table().models["gpt-4o"]
    assert prices.upstreams["local-vllm"] == UpstreamPrice(2.5, 0.12)


def test_bad_prices_are_named_by_path() -> None:
    with pytest.raises(ConfigError) as caught:
        config.parse(
            {
                "upstreams": [{"name": "a", "url": "http://x/v1"}],
                "pricing": {
                    "models": {"m": {"input": -1, "output": 1, "extra": 2}},
                    "upstreams": {"b": {"gpu_hour_usd": 1}},
                },
            },
            {},
        )
    assert caught.value.problems == [
        "pricing.models.m.extra: unknown key (expected one of: input, cached_input, output)",
        "pricing.models.m.input: expected a number >= 0, got -1",
        "pricing.upstreams.b: no upstream is named 'b' (upstreams: a)",
    ]


def test_gpu_time_is_split_evenly_among_requests_in_flight() -> None:
    occ = Occupancy()
    s = 1_000_000_000
    a = occ.begin(0)  # A alone for 1 s, then A and B share 2 s, then B alone for 1 s
    b = occ.begin(1 * s)
    assert occ.end(3 * s, a) == pytest.approx(2.0)
    assert occ.end(4 * s, b) == pytest.approx(2.0)
    c = occ.begin(10 * s)  # idle time in between is nobody's
    assert occ.end(11 * s, c) == pytest.approx(1.0)
