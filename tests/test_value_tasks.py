"""The task book: when a task closes, under which result, with which figures; never twice."""

from __future__ import annotations

from meterproxy.exchange import RequestKeys
from meterproxy.value.tasks import (
    NO_MODEL,
    Figures,
    RecentAlone,
    Report,
    Result,
    Settled,
    TaskBook,
)

IDLE_S, GRACE_S = 60.0, 5.0


def settled(key: str, _task: str, tenant: str = "t", **changes: object) -> Settled:
    """`_task`: what the request was opened under, for the reader (the book knows it)."""
    values: dict[str, object] = {
        "key": key,
        "tenant": tenant,
        "model": "m",
        "reached_upstream": True,
        "cost_usd": 0.01,
        "energy_j": 2.0,
        "tokens": 100,
        **changes,
    }
    return Settled(**values)  # type: ignore[arg-type]


def run(book: TaskBook, key: str, task: str, at_s: float, **changes: object) -> Figures | None:
    book.opened(key, "t", task, at_s)
    return book.settled(settled(key, task, **changes), at_s)


def test_a_rated_task_closes_after_the_grace_with_every_attempt_and_the_last_report() -> None:
    book = TaskBook(max_open=100)
    run(book, "r1", "T", 0.0, cost_usd=0.02, model="small", tokens=50)  # a failed attempt
    run(book, "r2", "T", 1.0, model="big", tokens=300)
    run(book, "r3", "T", 2.0, model="small", tokens=60)
    assert book.report(("t", "T"), Report(True), 3.0)
    assert book.report(("t", "T"), Report(False, 0.2), 4.0)  # the last report wins
    assert book.due(4.0 + GRACE_S - 0.1, IDLE_S, GRACE_S) == []
    [closed] = book.due(4.0 + GRACE_S, IDLE_S, GRACE_S)
    assert closed == Figures("t", "big", Result.FAILURE, 0.04, 6.0, 410, True)
    assert book.due(1000.0, IDLE_S, GRACE_S) == []  # counted once
    assert not book.report(("t", "T"), Report(True), 1001.0)  # closed: the tables only


def test_nothing_closes_while_a_request_is_in_flight() -> None:
    book = TaskBook(max_open=100)
    run(book, "r1", "T", 0.0)
    book.opened("r2", "t", "T", 1.0)  # a long generation
    book.report(("t", "T"), Report(True), 2.0)  # reported before it settles: kept
    assert book.in_flight(("t", "T")) == 1
    assert book.due(500.0, IDLE_S, GRACE_S) == []
    assert book.settled(settled("r2", "T", cost_usd=0.5), 600.0) is None
    assert book.due(600.0 + GRACE_S - 1, IDLE_S, GRACE_S) == []
    [closed] = book.due(600.0 + GRACE_S, IDLE_S, GRACE_S)
    assert (closed.result, closed.cost_usd) == (Result.SUCCESS, 0.51)


def test_an_unrated_task_closes_unknown_after_the_idle_window() -> None:
    book = TaskBook(max_open=100)
    run(book, "r1", "T", 0.0)
    run(book, "r2", "T2", 10.0)
    assert book.due(IDLE_S - 1, IDLE_S, GRACE_S) == []
    [first] = book.due(IDLE_S, IDLE_S, GRACE_S)
    [second] = book.due(IDLE_S + 10, IDLE_S, GRACE_S)
    assert (first.result, second.result) == (Result.UNKNOWN, Result.UNKNOWN)


def test_a_request_sent_alone_is_its_own_task_and_closes_after_the_grace() -> None:
    # Nothing can join a task without an id: it waits only for a report, like a rated task.
    book = TaskBook(max_open=100)
    book.opened("r1", "t", None, 0.0)
    assert book.request("r1") == ("t", "r1")  # named by the request's key
    book.settled(settled("r1", "r1", model="small"), 1.0)
    book.opened("r2", "t", None, 2.0)
    book.settled(settled("r2", "r2"), 3.0)
    assert book.report(("t", "r2"), Report(True), 4.0)  # by request id, within the grace
    assert book.due(1.0 + GRACE_S - 0.1, IDLE_S, GRACE_S) == []
    [unrated] = book.due(1.0 + GRACE_S, IDLE_S, GRACE_S)
    assert (unrated.model, unrated.result, unrated.closes) == ("small", Result.UNKNOWN, True)
    [rated] = book.due(4.0 + GRACE_S, IDLE_S, GRACE_S)
    assert rated.result is Result.SUCCESS and book.open_tasks == 0
    assert not book.report(("t", "r1"), Report(True), 20.0)  # closed: the tables only


def test_a_request_alone_reported_while_in_flight_keeps_the_report() -> None:
    book = TaskBook(max_open=100)
    book.opened("r1", "t", None, 0.0)
    assert book.is_open(("t", "r1")) and book.in_flight(("t", "r1")) == 1
    assert not book.is_open(("u", "r1"))  # another tenant's name for it: not theirs
    assert not book.report(("u", "r1"), Report(True), 0.5)
    assert book.report(("t", "r1"), Report(False, 0.1), 1.0)  # before it settles: kept
    assert book.open_tasks == 1
    book.settled(settled("r1", "r1", model="small", tokens=7), 2.0)
    assert book.in_flight(("t", "r1")) == 0 and book.is_open(("t", "r1"))
    assert book.due(2.0 + GRACE_S - 0.1, IDLE_S, GRACE_S) == []
    [closed] = book.due(2.0 + GRACE_S, IDLE_S, GRACE_S)
    assert closed == Figures("t", "small", Result.FAILURE, 0.01, 2.0, 7, True)
    assert book.open_tasks == 0 and not book.is_open(("t", "r1"))
    assert book.knows(("t", "r1")) and not book.knows(("u", "r1"))  # recent: for feedback
    assert book.request("r1") == ("t", "r1")


def test_a_refusal_alone_closes_uncounted_unless_reported() -> None:
    book = TaskBook(max_open=100)
    for key in ("a", "b"):
        book.opened(key, "t", None, 0.0)
        book.settled(settled(key, key, reached_upstream=False), 0.0)
    assert book.report(("t", "b"), Report(False), 1.0)
    assert book.due(1.0 + GRACE_S, IDLE_S, GRACE_S) == [
        Figures("t", NO_MODEL, Result.FAILURE, 0.0, 0.0, 0, True)
    ]
    assert book.open_tasks == 0


def test_due_closes_at_most_its_limit_and_the_rest_next_time() -> None:
    book = TaskBook(max_open=100)
    for i in range(5):
        book.opened(f"r{i}", "t", None, 0.0)
        book.settled(settled(f"r{i}", f"r{i}"), 0.0)
    book.opened("refused", "t", None, 0.0)  # refused before the upstream: closes, uncounted
    book.settled(settled("refused", "refused", reached_upstream=False), 0.0)
    sizes = []
    while True:
        figures, more = book.close_due(GRACE_S, IDLE_S, GRACE_S, 2)
        sizes.append(len(figures))
        if not more:
            break
    assert sizes == [2, 2, 1]  # six closes, two a call; the refused one counts no figures
    assert book.open_tasks == 0 and book.close_due(GRACE_S, IDLE_S, GRACE_S, 2) == ([], False)


def test_a_late_request_adds_to_the_closed_result_without_counting_the_task_again() -> None:
    book = TaskBook(max_open=100)
    run(book, "r1", "T", 0.0, model="big")
    book.report(("t", "T"), Report(True), 0.0)
    [closed] = book.due(GRACE_S, IDLE_S, GRACE_S)
    assert closed.closes and closed.result is Result.SUCCESS
    late = run(book, "r2", "T", 100.0, model="other", cost_usd=0.3)
    assert late == Figures("t", "big", Result.SUCCESS, 0.3, 2.0, 100, False)
    assert book.due(10_000.0, IDLE_S, GRACE_S) == []
    assert book.request("r2") == ("t", "T")


def test_refusals_alone_are_no_task_but_a_reported_refusal_is() -> None:
    book = TaskBook(max_open=100)
    run(book, "r1", "T", 0.0, reached_upstream=False)
    assert book.due(IDLE_S, IDLE_S, GRACE_S) == []  # a 429 loop nobody rated: nothing ran
    run(book, "r2", "U", 0.0, reached_upstream=False)
    book.report(("t", "U"), Report(False), 0.0)
    [closed] = book.due(GRACE_S, IDLE_S, GRACE_S)
    assert (closed.model, closed.result, closed.cost_usd) == (NO_MODEL, Result.FAILURE, 0.0)


def test_a_request_never_opened_is_nobodys_and_tenants_are_apart() -> None:
    book = TaskBook(max_open=100)
    assert book.settled(settled("stray", "T"), 0.0) is None
    assert book.request("stray") is None
    book.opened("a1", "a", "T", 0.0)
    book.opened("b1", "b", "T", 0.0)
    assert book.tenants("T") == {"a", "b"}
    assert book.request("a1") == ("a", "T") and book.request("b1") == ("b", "T")
    book.settled(settled("a1", "T", tenant="a"), 0.0)
    book.settled(settled("b1", "T", tenant="b"), 0.0)
    assert len(book.due(IDLE_S, IDLE_S, GRACE_S)) == 2
    assert book.tenants("T") == set() and book.knows(("a", "T"))
    book.opened("a2", "a", "U", 0.0)
    book.opened("b2", "b", "U", 0.0)
    book.settled(settled("a2", "U", tenant="a"), 0.0)
    book.report(("a", "U"), Report(True), 0.0)  # a's task closes first
    assert len(book.due(GRACE_S, IDLE_S, GRACE_S)) == 1
    assert book.tenants("U") == {"b"} and book.is_open(("b", "U"))


def test_past_max_open_the_longest_idle_task_closes_early() -> None:
    book = TaskBook(max_open=2)
    for i in range(3):
        run(book, f"r{i}", f"T{i}", float(i))
    [evicted] = book.due(3.0, IDLE_S, GRACE_S)
    assert evicted.result is Result.UNKNOWN and book.open_tasks == 2
    assert not book.is_open(("t", "T0")) and book.is_open(("t", "T2"))


def test_past_max_open_the_longest_quiet_task_goes_first_named_or_not() -> None:
    # Requests sent alone wait in another queue than named tasks; eviction still takes the
    # longest quiet of both, so a burst of lone requests does not push out an older named task
    # before its own older lone ones.
    book = TaskBook(max_open=3)
    book.opened("a1", "t", None, 0.0)
    book.settled(settled("a1", "a1"), 0.0)
    run(book, "n1", "T", 1.0)
    book.opened("a2", "t", None, 2.0)
    book.settled(settled("a2", "a2"), 2.0)
    book.opened("a3", "t", None, 3.0)
    book.settled(settled("a3", "a3"), 3.0)
    book.due(3.0, IDLE_S, GRACE_S)
    assert not book.is_open(("t", "a1")) and book.is_open(("t", "T"))
    book.opened("a4", "t", None, 3.5)
    book.settled(settled("a4", "a4"), 3.5)
    book.due(3.5, IDLE_S, GRACE_S)
    assert not book.is_open(("t", "T")) and book.is_open(("t", "a2"))


def test_a_task_of_refusals_alone_is_forgotten_so_its_retry_starts_afresh() -> None:
    book = TaskBook(max_open=100)
    run(book, "r1", "T", 0.0, reached_upstream=False)  # a 429, then a long back-off
    assert book.due(IDLE_S, IDLE_S, GRACE_S) == [] and not book.knows(("t", "T"))
    assert run(book, "r2", "T", 100.0) is None  # the retry: a task again, not a late request
    book.report(("t", "T"), Report(True), 101.0)
    [closed] = book.due(101.0 + GRACE_S, IDLE_S, GRACE_S)
    assert (closed.result, closed.model, closed.closes) == (Result.SUCCESS, "m", True)


def test_recent_requests_alone_are_remembered_by_their_number_in_a_ring() -> None:
    keys, other = RequestKeys(), RequestKeys()
    recent = RecentAlone(5000)
    made = [keys.new() for _ in range(12_000)]
    assert recent.get(made[0]) is None  # nothing yet (and a lookup learns no prefix)
    for i, key in enumerate(made):
        assert recent.add(key, f"tenant{i % 3}")
    assert recent.get(made[-1]) == "tenant2" and recent.get(made[-5000]) == "tenant1"
    assert recent.get(made[-5001]) is None  # the ring holds the last 5000
    assert recent.get(made[0]) is None  # older than the last 5000: forgotten
    assert recent.get(other.new()) is None  # another process's key with a number held here
    assert not recent.add("r1", "t") and recent.get("r1") is None  # not a proxy key: elsewhere


def test_a_settled_request_alone_is_found_by_its_proxy_key() -> None:
    keys = RequestKeys()
    book = TaskBook(max_open=100)
    key = keys.new()
    book.opened(key, "t", None, 0.0)
    book.settled(settled(key, key), 0.0)
    book.due(GRACE_S, IDLE_S, GRACE_S)
    assert book.request(key) == ("t", key) and book.knows(("t", key))


def test_a_ring_slot_taken_by_a_newer_request_leaves_an_older_one_findable() -> None:
    keys = RequestKeys()
    book = TaskBook(max_open=100, max_remembered=8)
    made = [keys.new() for _ in range(10)]
    book.opened(made[0], "t", None, 0.0)  # a long stream
    for key in made[1:]:
        book.opened(key, "t", None, 1.0)
        book.settled(settled(key, key), 1.0)
    book.settled(settled(made[0], made[0]), 2.0)  # its slot went to a newer number
    for key in made:
        assert book.request(key) == ("t", key) and book.knows(("t", key)), key
    book.due(2.0 + GRACE_S, IDLE_S, GRACE_S)  # closed: found by the ring or the fallback
    assert book.request(made[0]) == ("t", made[0]) and book.request(made[-1]) == ("t", made[-1])


def test_only_the_keys_own_spelling_is_a_number() -> None:
    keys = RequestKeys()
    recent = RecentAlone(100)
    key = keys.new()
    assert recent.add(key, "t")
    prefix = key.rpartition("-")[0]
    for spelling in ("\u00b2", "\u2460", "\u0661", "01", "0", "", "1x"):
        assert recent.get(f"{prefix}-{spelling}") is None, spelling  # no error, no alias
    assert recent.get(key) == "t"
