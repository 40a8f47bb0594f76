"""GPU time split among requests in flight: S(t) = ∫ dt / n(t), a request's share the
difference of S between its end and its start."""

from __future__ import annotations

import pytest

from meterproxy.occupancy import Occupancy

S = 1_000_000_000


def test_a_request_alone_gets_its_whole_wall_time() -> None:
    occ = Occupancy()
    mark = occ.begin(5 * S)
    assert occ.end(8 * S, mark) == pytest.approx(3.0)


def test_overlapping_requests_split_the_time_they_share() -> None:
    # a: 0..4 s, b: 2..6 s. 0-2 a alone, 2-4 shared by two, 4-6 b alone.
    occ = Occupancy()
    a = occ.begin(0)
    b = occ.begin(2 * S)
    a_s = occ.end(4 * S, a)
    b_s = occ.end(6 * S, b)
    assert a_s == pytest.approx(3.0) and b_s == pytest.approx(3.0)
    assert a_s + b_s == pytest.approx(6.0)  # the busy wall time, no more, no less


def test_shares_add_up_to_the_busy_time_and_idle_time_belongs_to_nobody() -> None:
    # Three requests, one starting while the upstream was idle for 10 s.
    occ = Occupancy()
    a = occ.begin(0)
    b = occ.begin(1 * S)
    c = occ.begin(1 * S)  # same instant: n jumps from 1 to 3
    shares = [occ.end(4 * S, a), occ.end(4 * S, b), occ.end(7 * S, c)]
    # 0-1: a alone (1); 1-4: three ways (1 each); 4-7: c alone (3).
    assert shares == pytest.approx([2.0, 1.0, 4.0])
    assert sum(shares) == pytest.approx(7.0)
    d = occ.begin(17 * S)  # 7-17 s idle
    assert occ.end(18 * S, d) == pytest.approx(1.0)


def test_a_request_of_zero_length_gets_nothing() -> None:
    occ = Occupancy()
    other = occ.begin(0)
    mark = occ.begin(3 * S)
    assert occ.end(3 * S, mark) == 0.0
    assert occ.end(4 * S, other) == pytest.approx(4.0)
