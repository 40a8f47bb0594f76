"""Settlement: exactly once, sinks guarded, completers that finish later, frozen results."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from meterproxy.config import Upstream
from meterproxy.endpoints import EMBEDDINGS, RESPONSES
from meterproxy.exchange import Exchange, Outcome, Waste
from meterproxy.policy import Tenant
from meterproxy.pricing import Cost
from meterproxy.quota import Ticket
from meterproxy.routing import Route
from meterproxy.settlement import EstimateCompleter, Settlement, Settler, freeze
from meterproxy.usage import Source, Usage

from .factories import exchange, settlement


def settler(errors: list[int], cost: float = 0.5) -> Settler:
    ticks = iter(range(50, 10_000, 50))
    return Settler(
        lambda: next(ticks),
        lambda: 1.7e9,
        price=lambda ex: Cost(cost, True),
        on_error=lambda: errors.append(1),
    )


def test_settle_runs_every_sink_exactly_once_and_guards_failures() -> None:
    seen: list[Settlement] = []
    errors: list[int] = []

    def broken(s: Settlement) -> None:
        raise ValueError("bug in a sink")

    s = settler(errors)
    s.add_sinks([broken, seen.append])
    ex = exchange(started_ns=10, reached_upstream=True)
    ex.answered(200)
    s.settle(ex)
    [only] = seen
    assert errors == [1] and only.duration_ns == 40 and only.cost_usd == 0.5
    assert only.outcome is Outcome.SUCCESS and only.request_id == "mp-test-1"
    with pytest.raises(AttributeError, match="can't set attribute"):  # final: immutable
        only.status = "500"  # type: ignore[misc]
    with pytest.raises(RuntimeError, match="settled twice"):
        s.settle(ex)
    assert len(seen) == 1


def test_a_request_that_never_reached_an_upstream_costs_nothing() -> None:
    seen: list[Settlement] = []
    s = settler([])
    s.add_sinks([seen.append])
    s.settle(exchange())
    assert seen[0].cost_usd == 0.0 and seen[0].priced


def test_completers_hold_a_settlement_until_each_is_done() -> None:
    seen: list[Settlement] = []
    s = settler([])
    s.add_sinks([seen.append])
    waiting: list[Callable[[], None]] = []

    def energy(ex: Exchange, done: Callable[[], None]) -> bool:
        def final() -> None:
            ex.energy_j = 12.5
            done()

        waiting.append(final)
        return True

    s.add_completer(energy)
    s.settle(exchange(reached_upstream=True))
    assert seen == [] and s.pending == 1
    waiting[0]()
    assert [x.energy_j for x in seen] == [12.5] and s.pending == 0


def test_a_completer_that_finishes_at_once_still_settles_once() -> None:
    seen: list[Settlement] = []
    s = settler([])
    s.add_sinks([seen.append])

    def immediate(ex: Exchange, done: Callable[[], None]) -> bool:
        ex.energy_j = None  # e.g. the energy source is down: unknown, at once
        done()
        return True

    s.add_completer(immediate)
    s.add_completer(immediate)
    s.settle(exchange(reached_upstream=True))
    assert len(seen) == 1 and s.pending == 0


def test_time_per_output_token() -> None:
    s = settlement(
        streamed=True, first_token_ns=1_000, ended_ns=10_000, usage=Usage(5, 10, None, None)
    )
    assert s.ttft_ns == 1_000
    assert s.tpot_ns == 1_000  # (10_000 - 1_000) / (10 - 1)
    assert s._replace(usage=Usage(5, 1, None, None)).tpot_ns is None


async def test_estimates_of_large_texts_are_counted_off_the_loop() -> None:
    seen: list[Settlement] = []
    threads: list[str] = []
    s = settler([])
    s.add_sinks([seen.append])
    tasks: list[asyncio.Task[None]] = []

    def count_text(ex: Exchange, text: str) -> int:
        import threading

        threads.append(threading.current_thread().name)
        return len(text) // 4

    s.add_completer(
        EstimateCompleter(
            count_prompt=lambda ex: 7,
            count_text=count_text,
            spawn=lambda name, coro: tasks.append(asyncio.ensure_future(coro)),  # type: ignore[func-returns-value]
            threshold_chars=1000,
        )
    )
    small = exchange(reached_upstream=True, pending_text="abcd" * 10)
    small.client_left()
    s.settle(small)
    assert seen[0].usage == Usage(7, 10, None, None, Source.PARTIAL) and seen[0].estimated
    big = exchange(key="mp-test-2", reached_upstream=True, pending_text="abcd" * 1000)
    big.answered(200)
    s.settle(big)
    assert len(seen) == 1  # counting in a worker thread
    await asyncio.gather(*tasks)
    assert seen[1].usage == Usage(7, 1000, None, None, Source.ESTIMATE)
    assert threads[0] == "MainThread" and threads[1] != "MainThread"


def test_embeddings_estimates_have_no_completion() -> None:
    seen: list[Settlement] = []
    s = settler([])
    s.add_sinks([seen.append])
    s.add_completer(
        EstimateCompleter(
            count_prompt=lambda ex: 3,
            count_text=lambda ex, text: 99,
            spawn=lambda name, coro: None,
            threshold_chars=1000,
        )
    )
    s.settle(exchange(endpoint=EMBEDDINGS, reached_upstream=True, pending_text=""))
    assert seen[0].usage.prompt == 3 and seen[0].usage.completion is None


def test_openers_hear_of_an_exchange_before_it_settles_and_are_guarded() -> None:
    errors: list[int] = []
    heard: list[str] = []

    def broken(ex: Exchange) -> None:
        raise ValueError("bug in an opener")

    s = settler(errors)
    s.add_opener(broken)
    s.add_opener(lambda ex: heard.append(ex.key))
    settled: list[Settlement] = []
    s.add_sinks([settled.append])
    ex = exchange(task_id="ticket-1", reached_upstream=True)
    s.opened(ex)
    assert heard == ["mp-test-1"] and errors == [1] and not settled
    ex.answered(200)
    ex.repeated()
    s.settle(ex)
    [frozen] = settled
    assert (frozen.task_id, frozen.duplicate, frozen.waste_reason) == (
        "ticket-1",
        True,
        "duplicate",
    )


def test_freeze_carries_every_field() -> None:
    """`freeze` builds the settlement positionally: every field gets a value no other field
    has, and each must land under its own name."""
    ticket = Ticket("t-ticket", 7, 1, 2, "2026-11-30")
    ex = Exchange(
        key="mp-key-1",
        endpoint=RESPONSES,
        started_ns=11,
        client_request_id="client-id",
        tenant=Tenant("tenant-a"),
        route=Route(Upstream("upstream-b", "http://127.0.0.1:1/v1"), "model-c"),
        ticket=ticket,
        upstream_request_id="upstream-id",
        first_token_ns=13,
        ended_ns=17,
        usage=Usage(19, 23, 29, 31, Source.ESTIMATE),
        estimated=True,
        gpu_seconds=0.37,
        energy_j=41.0,
        client_user="user-d",
        task_id="task-e",
        stream=True,
        reached_upstream=True,
        outcome=Outcome.CLIENT_DISCONNECT,
        status="499",
        waste=Waste.CLIENT_DISCONNECT,
        upstream_error="read_timeout",
        duplicate=True,
    )
    expected = Settlement(
        request_id="mp-key-1",
        endpoint=RESPONSES.name,
        tenant="tenant-a",
        model="model-c",
        upstream="upstream-b",
        status="499",
        outcome=Outcome.CLIENT_DISCONNECT,
        usage=Usage(19, 23, 29, 31, Source.ESTIMATE),
        estimated=True,
        streamed=True,
        started_ns=11,
        first_token_ns=13,
        ended_ns=17,
        ts=1.75e9,
        reached_upstream=True,
        waste_reason="client_disconnect",
        upstream_error="read_timeout",
        client_request_id="client-id",
        upstream_request_id="upstream-id",
        client_user="user-d",
        gpu_seconds=0.37,
        energy_j=41.0,
        cost_usd=0.43,
        priced=False,
        ticket=ticket,
        task_id="task-e",
        duplicate=True,
    )
    frozen = freeze(ex, 1.75e9, Cost(0.43, False))
    assert frozen._asdict() == expected._asdict()
