"""The attribution engine on hand-made timelines: idle vs busy (edges included), static by
residency, dynamic by work, the work the proxy cannot see (non-streamed decode, prefill bounded
by the first token, cached prompt tokens, a burst's prefill queue), counter lumps carried, and
exact conservation under random traffic, resets and glitches, with the defaults and with a
trusted fit."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from meterproxy.energy.attribution import Engine, Weights, _queued
from meterproxy.energy.calibration import EnergyModel, FitState
from meterproxy.energy.workload import NEVER

MS = 1_000_000
G = ("gpu0",)


def engine(**kw: object) -> Engine:
    kw.setdefault("calibrate", False)
    return Engine(Weights(**kw), board_w=lambda gpu: 700.0)  # type: ignore[arg-type]


def final(e: Engine, key: str) -> float:
    done = e.finished(key, G)
    assert done is not None, key
    return done[0]


def test_nothing_in_flight_is_idle_energy() -> None:
    e = engine()
    for k in range(11):
        e.reading("gpu0", k * 100 * MS, k * 6_000)  # 60 W for 1 s
    book = e.books["gpu0"]
    assert (book.measured_mj, book.idle_mj, book.attributed_mj) == (60_000, 60_000, 0)


def test_static_by_residency_dynamic_by_work() -> None:
    e = engine(default_baseline_w=100.0)
    e.reading("gpu0", 0, 0)
    e.start("a", G, "A", 0, 0, True)
    e.start("b", G, "B", 0, 0, True)
    e.first_token("a", G, 0)
    e.first_token("b", G, 0)
    e.decoded("a", G, 50 * MS, 3)  # a does 3x the work of b in this interval
    e.decoded("b", G, 50 * MS, 1)
    e.reading("gpu0", 100 * MS, 50_000)  # 500 W over 100 ms: static 10 J, dynamic 40 J
    e.end("a", G, 100 * MS)
    e.end("b", G, 100 * MS)
    e.reading("gpu0", 200 * MS, 50_000)
    e.reading("gpu0", 300 * MS, 50_000)
    a, b = e.finished("a", G), e.finished("b", G)
    assert a is not None and b is not None
    assert a[0] == pytest.approx(5_000 + 30_000)  # half the static, 3/4 of the dynamic
    assert b[0] == pytest.approx(5_000 + 10_000)
    assert a[1] + b[1] == pytest.approx(100 * MS)  # the interval's busy time, shared the same way


def test_idle_at_the_edges_of_a_busy_period_is_not_billed() -> None:
    e = engine()
    for k in range(6):  # 100 W idle: the baseline
        e.reading("gpu0", k * 100 * MS, k * 10_000)
    e.start("a", G, "A", 550 * MS, 0, True)  # in the engine for the second half of the interval
    e.first_token("a", G, 560 * MS)
    e.decoded("a", G, 560 * MS, 1)
    e.reading("gpu0", 600 * MS, 50_000 + 5_000 + 20_000)  # 5 J idle half, 20 J busy half
    e.end("a", G, 600 * MS)
    e.reading("gpu0", 700 * MS, 85_000)  # idle again
    e.reading("gpu0", 800 * MS, 95_000)
    assert final(e, "a") == pytest.approx(20_000)


def alone_in_a_half_busy_interval(fit_idle_w: float) -> float:
    """A request alone, busy for the second half of an interval after 100 W idle ones, under
    a young fit (idle level as given, floor 100 W, no per-token terms): its energy (mJ). The
    interval holds 5 J idle and 45 J busy, where the fit says floor and idle give 10 J."""
    e = engine(calibrate=True)
    for k in range(6):  # 100 W idle
        e.reading("gpu0", k * 100 * MS, k * 10_000)
    model = EnergyModel(
        idle_w=fit_idle_w, floor_w=100.0, step_j=0.0, prefill_j=0.0, decode_j=0.0, context_j=0.0
    )
    e.books["gpu0"].fit.state = FitState(
        model, trusted=False, error_ratio=None, windows=1.0, usable=True
    )
    e.start("a", G, "A", 550 * MS, 0, True)
    e.first_token("a", G, 560 * MS)
    e.decoded("a", G, 560 * MS, 1)
    e.reading("gpu0", 600 * MS, 50_000 + 5_000 + 45_000)
    e.end("a", G, 600 * MS)
    e.reading("gpu0", 700 * MS, 110_000)  # idle again
    e.reading("gpu0", 800 * MS, 120_000)
    return final(e, "a")


def test_with_a_fit_the_idle_part_of_an_interval_is_idle_at_its_level_not_its_error() -> None:
    """A young fit mispredicts what a request draws (here by half); that error is the
    request's, not the idle half of the interval's: a request alone still gets all of the
    energy above idle, whatever the fit's terms."""
    assert alone_in_a_half_busy_interval(100.0) == pytest.approx(45_000)


def test_a_fit_whose_idle_level_is_too_high_does_not_take_what_a_request_drew() -> None:
    """The fit says 150 W idle, the idle intervals measured 100 W: the idle half of a partly
    busy interval is idle at 100 W, and the request alone gets all of the energy above it
    (at the fit's 150 W it would get 42.5 J)."""
    assert alone_in_a_half_busy_interval(150.0) == pytest.approx(45_000)


def test_energy_is_final_after_the_interval_that_follows_the_end() -> None:
    e = engine()
    e.reading("gpu0", 0, 0)
    e.start("a", G, "A", 10 * MS, 5, True)
    e.first_token("a", G, 20 * MS)
    e.end("a", G, 50 * MS)
    assert e.finished("a", G) is None
    e.reading("gpu0", 100 * MS, 20_000)
    assert e.finished("a", G) is None  # the counter may still owe it some
    e.reading("gpu0", 200 * MS, 20_000)
    assert final(e, "a") == pytest.approx(20_000)
    assert e.finished("a", G) is None  # read once


def test_what_the_counter_owed_after_the_end_is_the_requests_not_idle() -> None:
    e = engine()
    for k in range(6):
        e.reading("gpu0", k * 100 * MS, k * 8_000)  # 80 W idle
    e.start("a", G, "A", 500 * MS, 0, True)
    e.first_token("a", G, 510 * MS)
    e.end("a", G, 600 * MS)
    e.reading("gpu0", 600 * MS, 40_000 + 30_000)
    # The counter updated late: the next interval holds 12 J of a's work on top of idle (8 J).
    e.reading("gpu0", 700 * MS, 70_000 + 20_000)
    e.reading("gpu0", 800 * MS, 98_000)
    assert final(e, "a") == pytest.approx(30_000 + 12_000)
    book = e.books["gpu0"]
    assert book.attributed_mj + book.idle_mj == pytest.approx(book.measured_mj)


def test_a_non_streamed_request_decodes_one_token_per_engine_step() -> None:
    """Beside a stream that shows the engine's step time, a non-streamed request of the same
    shape does the same work interval by interval, not all at once when its body arrives."""
    e = engine(default_baseline_w=100.0)
    e.reading("gpu0", 0, 0)
    e.start("s", G, "A", 0, 0, True)
    e.start("n", G, "A", 0, 0, False)
    e.first_token("s", G, 5 * MS)
    counter = 0
    for k in range(1, 11):
        for step in range(4):  # a step every 25 ms
            e.decoded("s", G, (k - 1) * 100 * MS + step * 25 * MS + 5 * MS, 1)
        counter += 40_000
        e.reading("gpu0", k * 100 * MS, counter)
    e.usage("s", G, 10, 0, 40)
    e.usage("n", G, 10, 0, 40)
    e.end("s", G, 1000 * MS)
    e.end("n", G, 1000 * MS)
    e.reading("gpu0", 1100 * MS, counter)
    e.reading("gpu0", 1200 * MS, counter)
    s, n = final(e, "s"), final(e, "n")
    assert s + n == pytest.approx(counter)
    assert n == pytest.approx(s, rel=0.1)


def test_time_to_first_token_bounds_prefill_and_cached_tokens_are_not_prefill() -> None:
    e = engine(default_baseline_w=100.0, prefill=1.0, decode=1.0)
    e.reading("gpu0", 0, 0)
    e.start("long", G, "A", 0, 50_000, True)  # estimated 50k prompt tokens, 2 s at 25k/s
    e.start("short", G, "A", 0, 0, True)
    e.first_token("short", G, 1 * MS)
    e.first_token("long", G, 20 * MS)  # the first token after 20 ms: at most ~750 prefilled
    for t in range(30, 100, 10):
        e.decoded("short", G, t * MS, 1)
    e.reading("gpu0", 100 * MS, 30_000)
    e.end("long", G, 100 * MS)
    e.end("short", G, 100 * MS)
    e.reading("gpu0", 200 * MS, 30_000)
    e.reading("gpu0", 300 * MS, 30_000)
    long, short = final(e, "long"), final(e, "short")
    assert long < 30_000 * 0.98  # 50k tokens of prefill would have taken nearly all of it
    cached = engine(default_baseline_w=100.0, prefill=1.0, decode=1.0)
    cached.reading("gpu0", 0, 0)
    cached.start("c", G, "A", 0, 1000, False)
    cached.start("d", G, "A", 0, 1000, False)
    cached.usage("c", G, 1000, 990, 5)  # 990 of its 1000 prompt tokens came from the cache
    cached.usage("d", G, 1000, 0, 5)
    cached.reading("gpu0", 100 * MS, 40_000)
    cached.end("c", G, 100 * MS)
    cached.end("d", G, 100 * MS)
    cached.reading("gpu0", 200 * MS, 40_000)
    cached.reading("gpu0", 300 * MS, 40_000)
    assert final(cached, "d") > 3 * final(cached, "c")
    assert short > 0


def test_a_burst_is_prefilled_at_the_engine_speed_not_at_its_first_tokens() -> None:
    """Four equal prompts queue at once; the engine prefills 10 tokens/ms in 150 ms steps of
    1,500 tokens, so a's first token comes after the first step, b's and c's together after the
    second (c's last chunk rode in b's step) and d's after the third. Equal work at a constant
    500 W: equal energy, although no prompt's first token tells where its prefill was done."""
    e = engine(prefill=1.0, prefill_s_per_token=0.0001)  # the speed streams have shown
    e.reading("gpu0", 0, 0)
    for key in "abcd":
        e.start(key, G, "A", 0, 1000, True)
    firsts = {"a": 150, "b": 300, "c": 300, "d": 450}  # ms
    counter = 0
    for end_ms in range(100, 600, 100):
        for key, at_ms in firsts.items():
            if end_ms - 100 < at_ms <= end_ms:
                e.first_token(key, G, at_ms * MS)
        counter += 50_000 if end_ms <= 400 else 25_000  # the last step ends at 450 ms
        e.reading("gpu0", end_ms * MS, counter)
    for key in "abcd":
        e.usage(key, G, 1000, 0, 1)
        e.end(key, G, 500 * MS)
    e.reading("gpu0", 600 * MS, counter)
    e.reading("gpu0", 700 * MS, counter)
    for key in "abcd":
        assert final(e, key) == pytest.approx(counter / 4, rel=0.02), key


def test_a_first_token_shows_every_earlier_prefill_done() -> None:
    """First come first served: a stream's first token shows the non-streamed prompt queued
    ahead of it prefilled too, although the configured speed (10 times too slow) says it would
    take a second. From then on both decode, one token per step, and share alike."""
    e = engine(prefill_s_per_token=0.001, step_s=0.01)
    e.reading("gpu0", 0, 0)
    e.start("n", G, "A", 0, 1000, False)  # no first token of its own
    e.start("s", G, "A", 0, 1000, True)
    counter = 0
    for k in range(1, 11):
        for t in range((k - 1) * 100 + 5, k * 100, 10):
            if t == 95:
                e.first_token("s", G, t * MS)
            if t >= 95:
                e.decoded("s", G, t * MS, 1)
        counter += 50_000
        e.reading("gpu0", k * 100 * MS, counter)
    for key in "ns":
        e.usage(key, G, 1000, 0, 91)
        e.end(key, G, 1000 * MS)
    e.reading("gpu0", 1100 * MS, counter)
    e.reading("gpu0", 1200 * MS, counter)
    n, s = final(e, "n"), final(e, "s")
    assert n + s == pytest.approx(counter)
    assert n == pytest.approx(s, rel=0.05)  # with the queue spread over a second: 1 : 3


def _random_traffic(
    e: Engine,
    rng: random.Random,
    start: Callable[[str, int, int, bool], None],
    read: Callable[[int, int], None],
    after_each: Callable[[], None],
    steps: int = 3000,
) -> int:
    """Random starts, first tokens, decoded tokens, ends and readings on gpu0; the test starts
    (key, t, prompt tokens, streamed) and reads (t, counter) itself, to look around each.
    Returns how many requests started."""
    live: list[str] = []
    t, counter, n = 0, 0, 0
    for _ in range(steps):
        t += rng.randint(1, 4) * MS
        roll = rng.random()
        if roll < 0.2 or not live:
            n += 1
            live.append(f"r{n}")
            start(live[-1], t, rng.choice((10, 100, 1000)), rng.random() < 0.5)
        elif roll < 0.4:
            e.first_token(rng.choice(live), G, t)
        elif roll < 0.55:
            e.decoded(rng.choice(live), G, t, 1)
        elif roll < 0.8:
            key = live.pop(rng.randrange(len(live)))
            e.usage(key, G, rng.randint(1, 4000), 0, rng.randint(1, 50))
            e.end(key, G, t)
        else:
            counter += rng.randint(0, 40_000)
            read(t, counter)
        after_each()
    return n


def test_a_busy_period_starts_only_when_no_live_request_is_in_the_prefill_queue() -> None:
    """Random traffic: at every start the engine begins a new busy period exactly when a look at
    every live request finds none queued (the engine keeps an index instead of looking)."""
    e = engine()
    e.reading("gpu0", 0, 0)
    book = e.books["gpu0"]
    resets = 0

    def start(key: str, t: int, prompt: int, streamed: bool) -> None:
        nonlocal resets
        empty = not any(_queued(s) for s in book.live.values())
        before = book.pace.period_ns
        e.start(key, G, "A", t, prompt, streamed)
        assert book.pace.period_ns == (t if empty else before), key
        resets += empty

    def index_within_live() -> None:
        assert set(book.queued) <= set(book.live)  # the index never outlives a live request

    n = _random_traffic(
        e, random.Random(7), start, lambda t, c: e.reading("gpu0", t, c), index_within_live
    )
    assert 50 < resets < n  # both answers were exercised


def test_placing_looks_at_every_live_request_still_in_the_prefill_queue_in_order() -> None:
    """Random traffic: before every reading, the requests the placing index holds include
    every live one a look at all of them finds not yet reached, with prompt left to place, or
    a stream without its first token, in the order they started; and the index never outlives
    a live request."""
    e = engine()
    e.reading("gpu0", 0, 0)
    book = e.books["gpu0"]
    looked = 0

    def read(t: int, counter: int) -> None:
        nonlocal looked
        queue = [
            k
            for k, s in book.live.items()
            if s.enter_ns == NEVER
            or s.prefill_left > 0.0
            or (s.streamed and s.first_ns is None and s.end_ns is None)
        ]
        assert [k for k in book.placing if k in queue] == queue
        looked += len(queue)
        e.reading("gpu0", t, counter)

    def placing_within_live() -> None:
        assert list(book.placing) == [k for k in book.live if k in book.placing]

    _random_traffic(
        e,
        random.Random(11),
        lambda key, t, prompt, streamed: e.start(key, G, "A", t, prompt, streamed),
        read,
        placing_within_live,
    )
    assert looked > 100 and len(book.placing) < len(book.live)


def test_two_counter_updates_in_one_interval_are_carried_not_dropped() -> None:
    e = engine()
    e.reading("gpu0", 0, 0)
    counter = 0
    for k in range(1, 21):  # 600 W, but the counter moves every other reading: 0, then 1.2 kW
        if k % 2 == 0:
            counter += 120_000
        e.reading("gpu0", k * 100 * MS, counter)
    book = e.books["gpu0"]
    assert book.clamped == 0
    assert book.measured_mj + book.carry_mj == counter
    assert book.idle_mj == book.measured_mj


def test_conservation_is_exact_under_random_traffic_resets_and_glitches() -> None:
    for calibrate in (False, True):
        rng = random.Random(4)
        e = engine(default_baseline_w=80.0, calibrate=calibrate)
        gpus = ("g0", "g1")
        counter = {"g0": 0, "g1": 0}
        live: dict[str, tuple[str, ...]] = {}
        first: set[str] = set()
        ended: dict[str, tuple[str, ...]] = {}
        for step in range(6000):
            t = step * 10 * MS
            if rng.random() < 0.05:
                name = f"r{step}"
                use = gpus if rng.random() < 0.5 else ("g0",)
                e.start(name, use, rng.choice("XYZ"), t, rng.randrange(1, 2000), rng.random() < 0.7)
                live[name] = use
            for name, use in list(live.items()):
                if name not in first and rng.random() < 0.3:
                    e.first_token(name, use, t)
                    first.add(name)
                elif name in first and rng.random() < 0.8:
                    e.decoded(name, use, t, rng.randrange(1, 4))
                if rng.random() < 0.01:
                    e.usage(name, use, rng.randrange(1, 2000), rng.randrange(0, 50), 30)
                    e.end(name, use, t)
                    ended[name] = use
                    del live[name]
            if step % 10 == 0:
                for gpu in gpus:
                    load = len([n for n, u in live.items() if gpu in u])
                    counter[gpu] += 7_000 + 3_000 * min(load, 10) + rng.randrange(0, 3_000)
                    if rng.random() < 0.005:
                        counter[gpu] = rng.randrange(0, 1000)  # a driver reload
                    if rng.random() < 0.003:
                        counter[gpu] += 5_000_000  # a glitch no counter lag explains
                    e.reading(gpu, t, counter[gpu])
        for name, use in live.items():
            e.end(name, use, 6000 * 10 * MS)
            ended[name] = use
        for k in (1, 2):
            for gpu in gpus:
                e.reading(gpu, (6000 + k * 10) * 10 * MS, counter[gpu] + k * 1_000)
        by_request = sum(final_of(e, name, use) for name, use in ended.items())
        books = e.books.values()
        measured = sum(b.measured_mj for b in books)
        idle = sum(b.idle_mj for b in books)
        attributed = sum(b.attributed_mj for b in books)
        assert sum(b.gaps for b in books) > 0 and sum(b.clamped for b in books) > 0
        assert abs(attributed + idle - measured) < 1  # to the millijoule
        assert abs(by_request - attributed) < 1
        assert idle > 0 and attributed > 0
        if calibrate:
            assert all(e.fit(g).trusted for g in gpus)


def final_of(e: Engine, key: str, gpus: tuple[str, ...]) -> float:
    done = e.finished(key, gpus)
    assert done is not None, key
    return done[0]
