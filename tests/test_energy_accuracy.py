"""Attribution against two simulated GPUs that know the truth, in virtual time
(benchmarks/energy_accuracy.py prints the full table). What must hold in every scenario: exact
conservation; aggregate within 2 % (the +5 % gain scenario measures 5 % more, as its sensor
does); per request, under both truth definitions, the issue's p90 targets (10 % one at a time
and equal streams, 15 % elsewhere) except where the README reports a miss; better than the naive
J/token split at p50 and p90. Also: the independent GPU's own books balance."""

from __future__ import annotations

from dataclasses import replace

import pytest

from meterproxy.energy.attribution import Weights
from meterproxy.energy.scenarios import (
    TRUTHS,
    Result,
    Scenario,
    both_truths_floor,
    run,
    scenarios,
    truth_gap,
)
from meterproxy.sim.gpu_engine import BatchGpu, Hardware, Job

SCENARIOS = {(s.gpu, s.name): s for s in scenarios()}
# Scenarios allowed to miss their target, with the bound they must still hold (the measured
# figure, so a regression fails). None since the fit is used, shrunk to the defaults, from the
# first busy window (bursts after idle on the batching GPU was 16.2 % / 15.5 % before).
MISSES: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module")
def results() -> dict[tuple[str, str], Result]:
    return {key: run(s) for key, s in SCENARIOS.items()}


def test_both_gpus_and_the_issues_scenarios_are_graded() -> None:
    batch = {name for gpu, name in SCENARIOS if gpu == "batch"}
    assert batch >= {
        "one at a time",
        "equal streams",
        "long prompts + long outputs",
        "long cached context",
        "bursts after idle",
        "streamed + non-streamed",
        "100 ms counter",
    }
    assert any(gpu == "twin" for gpu, _ in SCENARIOS)


def test_conservation_is_exact_in_every_scenario(results: dict[tuple[str, str], Result]) -> None:
    for r in results.values():
        assert r.conservation_mj < 1.0, r


def test_aggregates_are_within_two_percent(results: dict[tuple[str, str], Result]) -> None:
    for (_, name), r in results.items():
        if name == "+5 % gain error":
            assert r.aggregate_error == pytest.approx(0.05, abs=0.01)
        else:
            assert r.aggregate_error < 0.02, r


def test_per_request_targets_under_both_truths(results: dict[tuple[str, str], Result]) -> None:
    for key, r in results.items():
        bound = MISSES.get(key, r.target_p90)
        for truth in TRUTHS:
            assert r.p90[truth] <= bound, (key, truth, r)
        assert r.meets_targets() == (key not in MISSES), key


def test_attribution_beats_naive_joules_per_token(results: dict[tuple[str, str], Result]) -> None:
    for r in results.values():
        for truth in TRUTHS:
            assert r.p50[truth] < r.naive_p50[truth] / 3, r
            assert r.p90[truth] < r.naive_p90[truth], r


def test_self_calibration_is_what_carries_the_unfamiliar_gpu() -> None:
    s: Scenario = SCENARIOS[("batch", "long prompts + long outputs")]
    fitted = run(s)
    defaults = run(s, replace(Weights(), calibrate=False))
    assert fitted.fit_trusted and not defaults.fit_trusted
    assert fitted.p90["residency"] < defaults.p90["residency"] - 0.1


def test_a_failed_source_leaves_energy_unknown_not_guessed(
    results: dict[tuple[str, str], Result],
) -> None:
    failed = results[("twin", "source fails at 40 s")]
    assert failed.unknown > 0 and failed.requests > 0


def test_the_batching_gpu_balances_its_books() -> None:
    gpu = BatchGpu(Hardware(), update_ms=100)
    jobs = [
        Job("a", 0.0, 3000, 50, prefix="doc", prefix_tokens=2900),
        Job("b", 1.0, 3000, 50, prefix="doc", prefix_tokens=2900),  # after a prefilled it
        Job("c", 0.1, 100, 300, streamed=False),
    ]
    gpu.serve(jobs, 10.0)
    assert [j.cached for j in jobs] == [0, 2896, 0]  # b found a's prefix, whole blocks
    assert all(len(j.token_times_s) == j.output and j.end_s is not None for j in jobs)
    idle = gpu.idle_j(jobs, 10.0)
    total = gpu.energy_j(10.0)
    assert sum(j.truth_work_j for j in jobs) + idle == pytest.approx(total)
    assert idle > 0 and idle < total
    # the counter moves only on its 100 ms grid
    assert gpu.counter_mj(1.161) == gpu.counter_mj(1.259) < gpu.counter_mj(1.262)


def test_no_figure_is_closer_to_both_truths_than_their_gap() -> None:
    # r = 100, w = 150: at the harmonic mean 120 both errors are 20 % = 50 / 250; any other
    # figure is further from one of them (a brute-force scan finds nothing better).
    assert truth_gap(100.0, 150.0) == pytest.approx(0.2)
    best = min(max(abs(x - 100) / 100, abs(x - 150) / 150) for x in range(50, 250))
    assert best == pytest.approx(0.2)
    assert truth_gap(150.0, 100.0) == truth_gap(100.0, 150.0)
    assert truth_gap(80.0, 80.0) == 0.0


def test_the_floor_lets_each_truth_miss_its_own_tenth() -> None:
    # 20 requests: `_pct` takes the 19th smallest (index 18) as p90, so each truth tolerates
    # one error above T. Gaps 0.01 .. 0.20: the two largest can each sit exactly on one truth
    # (missing only the other), so the third largest, 0.18, is the lowest T both can meet.
    pairs = [(100.0, 100.0 * (1 + g) / (1 - g)) for g in (k / 100 for k in range(1, 21))]
    assert [truth_gap(r, w) for r, w in pairs][-1] == pytest.approx(0.20)
    assert both_truths_floor(pairs) == pytest.approx(0.18)
    # and it is reachable: the harmonic mean where the gap is <= T, one truth exactly above it
    attributed = [2 * r * w / (r + w) for r, w in pairs[:18]] + [pairs[18][0], pairs[19][1]]
    for k in (0, 1):
        errors = [abs(x - p[k]) / p[k] for x, p in zip(attributed, pairs, strict=True)]
        assert sorted(errors)[18] == pytest.approx(0.18)
    assert both_truths_floor([]) == 0.0


def test_no_scenario_misses_only_because_its_truths_disagree(
    results: dict[tuple[str, str], Result],
) -> None:
    for key, r in results.items():
        # a floor: the real attribution cannot be below it under both truths at once
        assert 0.0 <= r.floor_p90 <= max(r.p90.values()), key
        assert r.floor_p90 <= r.gap_p90, key  # misses shared between the truths: at most p90
        assert r.floor_p90 < r.target_p90, key
