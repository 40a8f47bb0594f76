"""The online fit of a GPU's energy model: it recovers a known model from noisy windows with
outliers, in bounded memory, and is trusted only when it predicts well."""

from __future__ import annotations

import random

import pytest

from meterproxy.energy.calibration import Calibration, EnergyModel

TRUE = EnergyModel(
    idle_w=80.0, floor_w=250.0, step_j=1.2, prefill_j=0.012, decode_j=0.05, context_j=0.03
)


def intervals(rng: random.Random, n: int, glitches: bool = False):  # type: ignore[no-untyped-def]
    for k in range(n):
        busy = 0.0 if k % 7 == 0 else rng.uniform(0.02, 0.1)
        steps = busy / rng.uniform(0.006, 0.03)
        prefill = rng.choice((0.0, 0.0, rng.uniform(0, 2000))) if busy else 0.0
        decode = steps * rng.randrange(1, 64) if busy else 0.0
        context = decode * rng.uniform(0.1, 8.0)
        energy = (
            TRUE.idle_w * 0.1
            + TRUE.floor_w * busy
            + TRUE.step_j * steps
            + TRUE.prefill_j * prefill
            + TRUE.decode_j * decode
            + TRUE.context_j * context
        ) * rng.gauss(1.0, 0.02)
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
    fit = Calibration()
    for row in list(intervals(random.Random(2), 60)):  # 6 windows
        fit.add(*row)
    assert fit.state.model is not None and not fit.state.trusted
    noise = Calibration()
    rng = random.Random(3)
    for _, busy, steps, prefill, decode, context, _ in intervals(rng, 2000):
        noise.add(0.1, busy, steps, prefill, decode, context, rng.uniform(5, 70))
    assert not noise.state.trusted  # no work term explains any of it


def test_memory_is_bounded() -> None:
    fit = Calibration()
    before = sorted(vars(fit))
    for row in intervals(random.Random(4), 5000):
        fit.add(*row)
    assert sorted(vars(fit)) == before
    assert all(len(r) == 6 for r in fit._xtx) and len(fit._xty) == 6
