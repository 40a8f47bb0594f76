"""The attribution engine on hand-made timelines: idle vs busy, static by residency, dynamic by
work, exact conservation under random traffic, resets and clamping."""

from __future__ import annotations

import random

import pytest

from meterproxy.energy.attribution import Engine, Weights

MS = 1_000_000
G = ("gpu0",)


def engine(**kw: float) -> Engine:
    return Engine(Weights(**kw), board_w=lambda gpu: 700.0)


def test_nothing_in_flight_is_idle_energy() -> None:
    e = engine()
    for k in range(11):
        e.reading("gpu0", k * 100 * MS, k * 6_000)  # 60 W for 1 s
    book = e.books["gpu0"]
    assert (book.measured_mj, book.idle_mj, book.attributed_mj) == (60_000, 60_000, 0)


def test_static_by_residency_dynamic_by_work() -> None:
    e = engine(default_baseline_w=100.0, prefill_s_per_token=0.0)
    e.reading("gpu0", 0, 0)
    e.start("a", G, "A", 0, 0)
    e.start("b", G, "B", 0, 0)
    e.first_token("a", G, 0, 0)
    e.first_token("b", G, 0, 0)
    e.decoded("a", G, 3)  # a does 3x the work of b in this interval
    e.decoded("b", G, 1)
    e.reading("gpu0", 100 * MS, 50_000)  # 500 W over 100 ms: static 10 J, dynamic 40 J
    e.end("a", G, 100 * MS)
    e.end("b", G, 100 * MS)
    e.reading("gpu0", 200 * MS, 50_000)
    a, b = e.finished("a", G), e.finished("b", G)
    assert a is not None and b is not None
    assert a[0] == pytest.approx(5_000 + 30_000)  # half the static, 3/4 of the dynamic
    assert b[0] == pytest.approx(5_000 + 10_000)
    assert a[1] + b[1] == pytest.approx(100 * MS)  # the interval's GPU time, shared the same way


def test_energy_is_final_only_after_a_sample_past_the_end() -> None:
    e = engine()
    e.reading("gpu0", 0, 0)
    e.start("a", G, "A", 10 * MS, 5)
    e.first_token("a", G, 5, 20 * MS)
    e.end("a", G, 50 * MS)
    assert e.finished("a", G) is None
    e.reading("gpu0", 100 * MS, 20_000)
    done = e.finished("a", G)
    assert done is not None and done[0] == pytest.approx(20_000)
    assert e.finished("a", G) is None  # read once


def test_conservation_is_exact_under_random_traffic_resets_and_clamps() -> None:
    rng = random.Random(4)
    e = engine(default_baseline_w=80.0)
    gpus = ("g0", "g1")
    counter = {"g0": 0, "g1": 0}
    live: dict[str, int] = {}
    ended: list[str] = []
    rid = 0
    measured_by_request = 0.0
    for step in range(3000):
        t = step * 10 * MS
        if rng.random() < 0.05:
            rid += 1
            name = f"r{rid}"
            use = gpus if rng.random() < 0.5 else ("g0",)
            e.start(name, use, rng.choice("XYZ"), t, rng.randrange(1, 2000))
            live[name] = 0
            setattr_use = use
            live_gpus[name] = setattr_use
        for name in list(live):
            use = live_gpus[name]
            if live[name] == 0 and rng.random() < 0.3:
                e.first_token(name, use, rng.randrange(1, 2000), t)
                live[name] = 1
            elif live[name] and rng.random() < 0.8:
                e.decoded(name, use, rng.randrange(1, 4))
            if rng.random() < 0.01:
                e.end(name, use, t)
                ended.append(name)
                del live[name]
        if step % 10 == 0:
            for gpu in gpus:
                counter[gpu] += rng.randrange(0, 100_000)  # up to 1 kW: some clamped
                if rng.random() < 0.01:
                    counter[gpu] = rng.randrange(0, 1000)  # a driver reload
                e.reading(gpu, t, counter[gpu])
    for name in list(live):
        e.end(name, live_gpus[name], 3000 * 10 * MS)
        ended.append(name)
    for gpu in gpus:
        e.reading(gpu, 3001 * 10 * MS, counter[gpu] + 1_000)
    for name in ended:
        done = e.finished(name, live_gpus[name])
        assert done is not None, name
        measured_by_request += done[0]
    total_measured = sum(b.measured_mj for b in e.books.values())
    total_idle = sum(b.idle_mj for b in e.books.values())
    total_attributed = sum(b.attributed_mj for b in e.books.values())
    assert (
        sum(b.gaps for b in e.books.values()) > 0 and sum(b.clamped for b in e.books.values()) > 0
    )
    assert abs(total_attributed + total_idle - total_measured) < 1  # to the millijoule
    assert abs(measured_by_request - total_attributed) < 1
    assert total_idle > 0 and total_attributed > 0


live_gpus: dict[str, tuple[str, ...]] = {}
