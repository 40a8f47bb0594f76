"""The shared runtime: background tasks kept, named, stopped by group, a crashing writer restarted
and counted; the live configuration swapped whole through one reference."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import CollectorRegistry

from meterproxy import config
from meterproxy.app import create_app
from meterproxy.keys import RUNTIME
from meterproxy.routing import Router
from meterproxy.runtime import Live, Tasks


async def forever() -> None:
    await asyncio.Event().wait()


async def test_spawned_tasks_are_named_and_stopped_by_their_group_only() -> None:
    tasks = Tasks()
    poller = tasks.spawn("poll-models:a", forever())
    writer = tasks.spawn("writer", forever(), group="ledger")
    assert poller.get_name() == "poll-models:a" and writer.get_name() == "writer"
    await asyncio.sleep(0)
    await tasks.stop("background")
    assert poller.cancelled() and not writer.done()
    await tasks.stop("nothing-here")  # an empty group is fine
    await tasks.stop("ledger")
    assert writer.cancelled()


async def test_a_finished_task_is_let_go_and_stopping_its_group_later_is_harmless() -> None:
    tasks = Tasks()
    ran: list[int] = []

    async def once() -> None:
        ran.append(1)

    task = tasks.spawn("once", once())
    await task
    await tasks.stop("background")
    assert ran == [1] and task.done() and not task.cancelled()


async def test_a_crash_is_logged_with_the_tasks_name(caplog: pytest.LogCaptureFixture) -> None:
    tasks = Tasks()

    async def broken() -> None:
        raise RuntimeError("disk on fire")

    with caplog.at_level(logging.ERROR, logger="meterproxy.runtime"):
        task = tasks.spawn("exporter", broken())
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)  # done callbacks run on the next turn
    [record] = [r for r in caplog.records if "exporter" in r.getMessage()]
    assert "crashed" in record.getMessage() and record.exc_info is not None


async def test_supervise_restarts_a_crashing_run_and_counts_each_crash(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = Tasks()
    crashes: list[int] = []
    starts: list[int] = []
    settled = asyncio.Event()

    async def writer() -> None:
        starts.append(1)
        if len(starts) <= 3:
            raise OSError("database is locked")
        settled.set()
        await forever()

    with caplog.at_level(logging.ERROR, logger="meterproxy.runtime"):
        task = tasks.supervise("ledger-writer", writer, lambda: crashes.append(1), backoff_s=0.001)
        await asyncio.wait_for(settled.wait(), 1.0)
    assert len(starts) == 4 and len(crashes) == 3 and not task.done()
    assert task.get_name() == "ledger-writer"
    assert sum("restarting it" in r.getMessage() for r in caplog.records) == 3
    await tasks.stop("ledger-writer")  # a supervised task is its own group
    assert task.cancelled()


async def test_supervise_ends_when_run_returns_and_cancel_is_not_a_crash() -> None:
    tasks = Tasks()
    crashes: list[int] = []

    async def done_at_once() -> None:
        return None

    finished = tasks.supervise("oneshot", done_at_once, lambda: crashes.append(1))
    await asyncio.wait_for(finished, 1.0)
    started = asyncio.Event()

    async def waits() -> None:
        started.set()
        await forever()

    waiting = tasks.supervise("waiting", waits, lambda: crashes.append(1))
    await started.wait()
    await Tasks.cancel(waiting)
    assert waiting.cancelled() and crashes == []


async def test_cancel_waits_for_every_task_to_end() -> None:
    tasks = Tasks()
    cleaned: list[str] = []

    async def holds(name: str) -> None:
        try:
            await forever()
        finally:
            await asyncio.sleep(0.01)  # cleanup that takes a moment
            cleaned.append(name)

    a, b = tasks.spawn("a", holds("a")), tasks.spawn("b", holds("b"))
    await asyncio.sleep(0)
    await Tasks.cancel(a, b)
    assert sorted(cleaned) == ["a", "b"]


def test_a_swap_replaces_the_whole_live_view_and_old_readers_keep_theirs() -> None:
    first = config.parse(
        {"upstreams": [{"name": "a", "url": "http://127.0.0.1:9/v1", "models": ["m1"]}]}, {}
    )
    second = config.parse(
        {"upstreams": [{"name": "b", "url": "http://127.0.0.1:8/v1", "models": ["m2"]}]}, {}
    )
    runtime = create_app(first, registry=CollectorRegistry(), energy=None)[RUNTIME]
    held = runtime.live  # what a request in flight reads once
    assert runtime.settings is first and runtime.router.resolve("m1") is not None
    new = Live(second, Router(second, {}))
    runtime.swap(new)
    assert runtime.live is new and runtime.current.live is new
    assert runtime.settings is second and runtime.router is new.router
    assert runtime.router.resolve("m1") is None and runtime.router.resolve("m2") is not None
    assert held.settings is first and held.router.resolve("m1") is not None
