"""The online fit of a GPU's energy model: it recovers a known model from noisy windows with
outliers, in bounded memory, and is trusted only when it predicts well."""

from __future__ import annotations

import math
import random

import pytest

from meterproxy.energy.calibration import Calibration, EnergyModel, Prior, _nonnegative_solve

TRUE = EnergyModel(
    idle_w=80.0, floor_w=250.0, step_j=1.2, prefill_j=0.012, decode_j=0.05, context_j=0.03
)


def true_j(busy: float, steps: float, prefill: float, decode: float, context: float) -> float:
    """What the GPU drew in a 100 ms interval, by the true model."""
    return (
        TRUE.idle_w * 0.1
        + TRUE.floor_w * busy
        + TRUE.step_j * steps
        + TRUE.prefill_j * prefill
        + TRUE.decode_j * decode
        + TRUE.context_j * context
    )


def intervals(rng: random.Random, n: int, glitches: bool = False):  # type: ignore[no-untyped-def]
    for k in range(n):
        busy = 0.0 if k % 7 == 0 else rng.uniform(0.02, 0.1)
        steps = busy / rng.uniform(0.006, 0.03)
        prefill = rng.choice((0.0, 0.0, rng.uniform(0, 2000))) if busy else 0.0
        decode = steps * rng.randrange(1, 64) if busy else 0.0
        context = decode * rng.uniform(0.1, 8.0)
        energy = true_j(busy, steps, prefill, decode, context) * rng.gauss(1.0, 0.02)
        if glitches and rng.random() < 0.02:
            energy *= 5  # a counter lump or a missed reading
        yield 0.1, busy, steps, prefill, decode, context, energy


@pytest.mark.parametrize(("glitches", "within"), [(False, 0.2), (True, 0.3)])
def test_recovers_a_known_model_despite_noise_and_glitches(glitches: bool, within: float) -> None:
    fit = Calibration()
    for row in intervals(random.Random(1), 3000, glitches=glitches):
        fit.add(*row)
    state = fit.state
    assert state.trusted and state.model is not None
    assert state.error_ratio is not None and state.error_ratio < 0.1
    for got, want in zip(state.model.values(), TRUE.values(), strict=True):
        assert got == pytest.approx(want, rel=within), (state.model, TRUE)


def test_not_trusted_before_enough_windows_or_when_nothing_explains_the_energy() -> None:
    """Trusted means backed by data; the fit is used (shrunk to the defaults) before that."""
    fit = Calibration()
    for row in list(intervals(random.Random(2), 60)):  # 6 windows
        fit.add(*row)
    assert fit.state.model is not None and not fit.state.trusted and fit.state.usable
    noise = Calibration()
    rng = random.Random(3)
    for _, busy, steps, prefill, decode, context, _ in intervals(rng, 2000):
        noise.add(0.1, busy, steps, prefill, decode, context, rng.uniform(5, 70))
    assert not noise.state.trusted and not noise.state.usable  # no work term explains any of it


def test_memory_is_bounded() -> None:
    fit = Calibration()
    before = sorted(vars(fit))
    for row in intervals(random.Random(4), 5000):
        fit.add(*row)
    assert sorted(vars(fit)) == before
    assert all(len(r) == 6 for r in fit._xtx) and len(fit._xty) == 6


def decode_windows(rng: random.Random, n: int):  # type: ignore[no-untyped-def]
    """Busy windows of decoding only (no prompt ever), batch size and context varying."""
    for _ in range(n):
        for _ in range(10):
            busy = rng.uniform(0.05, 0.1)
            steps = busy / 0.02
            decode = steps * rng.randrange(1, 64)
            context = decode * rng.uniform(0.1, 8.0)
            energy = true_j(busy, steps, 0.0, decode, context) * rng.gauss(1.0, 0.01)
            yield 0.1, busy, steps, 0.0, decode, context, energy
        yield 0.001, 0.0, 0.0, 0.0, 0.0, 0.0, TRUE.idle_w * 0.001  # closes the window


def predict(model: EnergyModel, row: tuple[float, ...]) -> float:
    dt, busy, steps, prefill, decode, context, _ = row
    return (
        model.idle_w * dt
        + model.floor_w * busy
        + model.step_j * steps
        + model.prefill_j * prefill
        + model.decode_j * decode
        + model.context_j * context
    )


def test_what_the_data_pins_down_is_used_before_trust() -> None:
    fit = Calibration()
    for row in decode_windows(random.Random(6), 5):
        fit.add(*row)
    state = fit.state
    assert state.usable and not state.trusted and state.model is not None
    # Five windows (half of what trust needs) pin the energy: a fresh one is predicted within 5 %
    fresh = list(decode_windows(random.Random(7), 1))
    got = sum(predict(state.model, r) for r in fresh)
    want = sum(r[-1] for r in fresh)
    assert got == pytest.approx(want, rel=0.05)
    # and context, which varies across them, has moved from the default of 0 to near the truth.
    assert state.model.context_j == pytest.approx(TRUE.context_j, rel=0.2)


def test_a_term_the_data_cannot_see_stays_at_its_default() -> None:
    prior = Prior(prefill_per_decode=0.03, context_per_decode=0.0)
    fit = Calibration(prior=prior)
    rows = list(decode_windows(random.Random(8), 6))
    for row in rows:
        fit.add(*row)
    model = fit.state.model
    assert model is not None and fit.state.usable
    # No prompt was ever prefilled: a prompt token costs what the defaults say, 3 % of a
    # decoded token's whole energy above idle (its own, plus its part of floor and steps).
    busy = [r for r in rows if r[1] > 0.0]
    per_token = (
        model.decode_j
        + model.floor_w * sum(r[1] for r in busy) / sum(r[4] for r in busy)
        + model.step_j * sum(r[2] for r in busy) / sum(r[4] for r in busy)
    )
    assert model.prefill_j == pytest.approx(0.03 * per_token, rel=0.25)


def test_a_fit_that_predicts_badly_is_not_used() -> None:
    noise = Calibration()
    rng = random.Random(3)
    for _, busy, steps, prefill, decode, context, _ in intervals(rng, 2000):
        noise.add(0.1, busy, steps, prefill, decode, context, rng.uniform(5, 70))
    assert noise.state.windows >= 10 and not noise.state.usable and not noise.state.trusted


def _rebuilt_solve(xtx: list[list[float]], xty: list[float]) -> list[float]:
    """The non-negative solve as first written: every round rebuilds its system from the sums
    and eliminates a fresh copy (the reference the reduced solve must equal bit for bit)."""
    n_all = len(xty)
    free = list(range(n_all))
    ridge = 1e-6 * max(1e-12, sum(xtx[i][i] for i in range(n_all)) / n_all)
    while free:
        m = [[xtx[i][j] + (ridge if i == j else 0.0) for j in free] + [xty[i]] for i in free]
        n = len(free)
        solved: list[float] | None = None
        for col in range(n):
            pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
            if abs(m[pivot][col]) < 1e-300 or not math.isfinite(m[pivot][col]):
                break
            m[col], m[pivot] = m[pivot], m[col]
            for r in range(col + 1, n):
                f = m[r][col] / m[col][col]
                if f:
                    for c in range(col + 1, n + 1):
                        m[r][c] -= f * m[col][c]
        else:
            solved = [0.0] * n
            for r in range(n - 1, -1, -1):
                s = sum(m[r][c] * solved[c] for c in range(r + 1, n))
                solved[r] = (m[r][n] - s) / m[r][r]
        if solved is None:
            break
        worst = min(range(n), key=lambda k: solved[k])
        if solved[worst] >= 0.0:
            out = [0.0] * n_all
            for k, i in enumerate(free):
                out[i] = solved[k]
            return out
        del free[worst]
    return [0.0] * n_all


def test_reduced_solve_equals_a_rebuild_each_round() -> None:
    # Random windows of correlated work, some with energy falling as work rises, so that the
    # solve drops terms over several rounds; every answer bit-equal to the rebuilt one.
    rng = random.Random(7)
    rounds = set()
    for _ in range(400):
        xtx = [[0.0] * 6 for _ in range(6)]
        xty = [0.0] * 6
        slopes = [rng.uniform(-2.0, 3.0) for _ in range(6)]
        for _ in range(rng.randint(1, 12)):
            base = rng.uniform(0.0, 2.0)
            x = [1.0] + [
                base * rng.uniform(0.5, 1.5) * rng.choice((0.0, 1.0, 1.0)) for _ in range(5)
            ]
            y = sum(s * v for s, v in zip(slopes, x, strict=True)) + rng.gauss(0.0, 0.1)
            for i in range(6):
                xty[i] += x[i] * y
                for j in range(6):
                    xtx[i][j] += x[i] * x[j]
        got = _nonnegative_solve(xtx, xty)
        assert [v.hex() for v in got] == [v.hex() for v in _rebuilt_solve(xtx, xty)]
        rounds.add(sum(v == 0.0 for v in got))
    assert {0, 1, 2} <= rounds  # all terms, one dropped, two dropped
