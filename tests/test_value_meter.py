"""The value meter's hooks on a real settler and a fresh registry: large bodies hashed off the
loop, duplicates counted, tasks swept into the counters once, feedback resolved by key."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from meterproxy import errors
from meterproxy.config import Upstream
from meterproxy.exchange import Exchange
from meterproxy.metrics import Metrics
from meterproxy.policy import Tenant
from meterproxy.pricing import Cost
from meterproxy.routing import Route
from meterproxy.settlement import Settlement, Settler
from meterproxy.usage import Source, Usage
from meterproxy.value.feedback import Feedback
from meterproxy.value.meter import INLINE_HASH_BYTES, SWEEP_BATCH, ValueMeter
from meterproxy.value.settings import ValueSettings
from meterproxy.value.tasks import Report

from .factories import exchange


class Clock:
    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


def build(registry: CollectorRegistry, clock: Clock, spawned: list[asyncio.Task[None]]) -> Any:
    metrics = Metrics(registry)
    settler = Settler(
        clock, lambda: 1.7e9, price=lambda ex: Cost(0.25, True), on_error=lambda: None
    )

    def spawn(name: str, coro: Coroutine[Any, Any, None]) -> None:
        spawned.append(asyncio.get_running_loop().create_task(coro, name=name))

    meter = ValueMeter(
        lambda: ValueSettings(task_idle_s=10, outcome_grace_s=1, duplicate_window_s=60),
        metrics,
        clock,
        lambda: 1.7e9,
        store=None,
        spawn=spawn,
    )
    settler.add_opener(meter.opened)
    settler.add_completer(meter.completer)
    settled: list[Settlement] = []
    settler.add_sinks([meter.settled, settled.append])
    return settler, meter, settled


def request(key: str, text: str, task: str | None = None, tenant: str = "a") -> Exchange:
    body = {"model": "m", "messages": [{"role": "user", "content": text}]}
    ex = exchange(key=key, task_id=task, tenant=Tenant(tenant), body=body, reached_upstream=True)
    ex.body_bytes = len(text) + 40
    ex.route = Route(Upstream(name="u", url="http://127.0.0.1:1/v1"), "m")
    return ex


async def test_large_bodies_are_hashed_off_the_loop_and_repeats_counted() -> None:
    registry, clock, spawned = CollectorRegistry(), Clock(), []
    settler, _, settled = build(registry, clock, spawned)
    big = "x" * (INLINE_HASH_BYTES + 1)
    for key in ("r1", "r2"):
        ex = request(key, big)
        settler.opened(ex)
        ex.answered(200)
        ex.account(Usage(10, 5, None, None, Source.UPSTREAM))
        settler.settle(ex)
        assert len(settled) == (key == "r2")  # this one is held until its digest is known
        await asyncio.gather(*spawned)
    assert [s.duplicate for s in settled] == [False, True]
    assert [s.waste_reason for s in settled] == [None, "duplicate"]
    assert (
        registry.get_sample_value(
            "meterproxy_duplicate_requests_total", {"tenant": "a", "model": "m"}
        )
        == 1
    )


async def test_tasks_sweep_into_the_counters_once_and_feedback_finds_them() -> None:
    registry, clock, spawned = CollectorRegistry(), Clock(), []
    settler, meter, _ = build(registry, clock, spawned)
    for key, text in (("r1", "one"), ("r2", "two")):
        ex = request(key, text, task="T")
        settler.opened(ex)
        ex.answered(200)
        ex.account(Usage(10, 5, None, None, Source.UPSTREAM))
        settler.settle(ex)
    accepted = await meter.report("a", Feedback(None, "r2", Report(True), param="request_id"))
    assert (accepted.task_id, accepted.open) == ("T", True)
    with pytest.raises(errors.NotYourTask):
        await meter.report("b", Feedback("T", None, Report(True)))
    with pytest.raises(errors.TaskNotFound):
        await meter.report("a", Feedback("U", None, Report(True)))
    clock.ns = int(0.9e9)
    meter.sweep()
    assert (
        registry.get_sample_value(
            "meterproxy_task_outcomes_total", {"tenant": "a", "model": "m", "result": "success"}
        )
        is None
    )
    clock.ns = int(2e9)
    meter.sweep()
    meter.sweep()
    labels = {"tenant": "a", "model": "m", "result": "success"}
    assert registry.get_sample_value("meterproxy_task_outcomes_total", labels) == 1
    assert registry.get_sample_value("meterproxy_task_cost_usd_total", labels) == 0.5
    assert registry.get_sample_value("meterproxy_task_tokens_total", labels) == 30


async def test_a_zero_window_turns_duplicate_detection_off() -> None:
    metrics = Metrics(CollectorRegistry())
    meter = ValueMeter(
        lambda: ValueSettings(duplicate_window_s=0),
        metrics,
        Clock(),
        lambda: 1.7e9,
        store=None,
        spawn=lambda name, coro: None,
    )
    for key in ("r1", "r2"):
        ex = request(key, "same")
        ex.answered(200)
        assert meter.completer(ex, lambda: None) is False
        assert not ex.duplicate
    assert len(meter.repeats) == 0


async def test_the_sweeper_closes_a_crowd_of_tasks_a_batch_per_turn_of_the_loop() -> None:
    registry, clock, spawned = CollectorRegistry(), Clock(), []
    settler, meter, _ = build(registry, clock, spawned)
    crowd = 3 * SWEEP_BATCH + 5  # requests sent alone: each its own task, due together
    for i in range(crowd):
        ex = request(f"r{i}", f"question {i}")
        settler.opened(ex)
        ex.answered(200)
        ex.account(Usage(10, 5, None, None, Source.UPSTREAM))
        settler.settle(ex)
    clock.ns = int(2e9)  # past the grace (1 s): all due
    labels = {"tenant": "a", "model": "m", "result": "unknown"}
    seen: list[float] = []

    async def watch() -> None:  # runs between the sweeper's batches, if it yields
        while not seen or seen[-1] < crowd:
            seen.append(registry.get_sample_value("meterproxy_task_outcomes_total", labels) or 0)
            await asyncio.sleep(0)

    sweeper = asyncio.create_task(meter.run())
    await asyncio.wait_for(watch(), 5)
    sweeper.cancel()
    assert seen[-1] == crowd
    # Summed per series before counting: every task's figures still arrive, once.
    assert registry.get_sample_value("meterproxy_task_tokens_total", labels) == 15 * crowd
    steps = sorted({n for n in seen if 0 < n < crowd})
    assert steps[:3] == [SWEEP_BATCH, 2 * SWEEP_BATCH, 3 * SWEEP_BATCH]
