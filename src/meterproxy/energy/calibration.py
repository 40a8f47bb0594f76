"""Self-calibration of one GPU's energy model: each window of sampling intervals (about 1 s) is a
row of a robust, exponentially forgetting least-squares fit of measured energy against the work
seen in it. Pure arithmetic in bounded memory (a 5x5 matrix per GPU), no I/O.

    energy_j = idle_w x dt_s + floor_w x busy_s + step_j x steps + prefill_j x prefill_tokens
             + decode_j x decode_tokens + context_j x decode_tokens x context_ktokens

`busy_s` is the time with any request in the engine: a serving engine draws a floor well above
idle whenever it runs, whatever the batch. `steps` are engine steps (each streams the weights
once, whatever the batch); without them a long prefill step, which displaces decode steps, would
look cheaper per token than it is. Rows are weighted down when their residual is far
outside the running residual scale (Huber), so a counter glitch or a missed reading cannot drag
the fit. The model is trusted only once enough busy windows have been predicted within
`max_error` (out of sample: each window is scored before it is learned).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TERMS = ("idle_w", "floor_w", "step_j", "prefill_j", "decode_j", "context_j")
# Features are divided by these before the fit so that the normal matrix is well conditioned.
_SCALE = (1.0, 1.0, 100.0, 1000.0, 100.0, 100.0)
_N = len(TERMS)


@dataclass(frozen=True)
class EnergyModel:
    idle_w: float  # the board with nothing running
    floor_w: float  # above idle while the engine runs (clocks and memory up)
    step_j: float  # per engine step (the weights streamed once, shared by the batch)
    prefill_j: float  # per prompt token prefilled (cached tokens are not prefilled)
    decode_j: float  # per token decoded
    context_j: float  # per token decoded, per 1000 tokens of context (KV-cache reads)

    def values(self) -> tuple[float, ...]:
        return (
            self.idle_w,
            self.floor_w,
            self.step_j,
            self.prefill_j,
            self.decode_j,
            self.context_j,
        )


@dataclass(frozen=True)
class FitState:
    """What the metrics and `meterproxy energy` show."""

    model: EnergyModel | None  # the latest fit (None before the first solve)
    trusted: bool  # attribution uses `model` (else the configured defaults)
    error_ratio: float | None  # robust out-of-sample error / mean window energy
    windows: float  # effective number of busy windows in the fit


class Calibration:
    def __init__(
        self,
        window_s: float = 1.0,
        half_life_windows: float = 900.0,
        min_windows: int = 10,
        max_error: float = 0.15,
        error_half_life_windows: float = 30.0,
    ) -> None:
        self.window_s, self.min_windows, self.max_error = window_s, min_windows, max_error
        self._decay = 0.5 ** (1.0 / half_life_windows)
        self._error_decay = 0.5 ** (1.0 / error_half_life_windows)
        self._xtx = [[0.0] * _N for _ in range(_N)]
        self._xty = [0.0] * _N
        self._row = [0.0] * _N  # the open window
        self._row_j = 0.0
        self._beta: list[float] | None = None  # scaled coefficients
        self._abs_res = 0.0  # decayed sums for the error ratio
        self._abs_y = 0.0
        self._scale: float | None = None  # running residual scale (for the Huber weights)
        self._busy_windows = 0.0
        self.state = FitState(None, False, None, 0.0)

    def add(
        self,
        dt_s: float,
        busy_s: float,
        steps: float,
        prefill: float,
        decode: float,
        context: float,
        energy_j: float,
    ) -> bool:
        """One closed sampling interval; returns True when it closed a window (state changed)."""
        row = self._row
        row[0] += dt_s
        row[1] += busy_s
        row[2] += steps
        row[3] += prefill
        row[4] += decode
        row[5] += context
        self._row_j += energy_j
        if row[0] < self.window_s:
            return False
        x = [v / s for v, s in zip(row, _SCALE, strict=True)]
        y = self._row_j
        self._row, self._row_j = [0.0] * _N, 0.0
        self._learn(x, y)
        return True

    def _learn(self, x: list[float], y: float) -> None:
        busy = x[1] > 0.0
        weight = 1.0
        if self._beta is not None:
            residual = y - sum(b * v for b, v in zip(self._beta, x, strict=True))
            if busy and self._busy_windows >= 3:  # scored once the fit has seen some work
                self._abs_res = self._abs_res * self._error_decay + abs(residual)
                self._abs_y = self._abs_y * self._error_decay + abs(y)
            scale = self._scale
            if scale is not None and scale > 0.0 and abs(residual) > 2.0 * scale:
                # Far residuals count less (Huber); very far ones not at all, once the fit
                # has seen enough to know what far is.
                far = abs(residual) > 5.0 * scale and self._busy_windows >= self.min_windows
                weight = 0.0 if far else 2.0 * scale / abs(residual)
            # The scale follows typical residuals: down quickly (the first fits are poor),
            # up slowly and at most 2x at a time (outliers must not widen it).
            if scale is None:
                self._scale = abs(residual)
            elif abs(residual) < scale:
                self._scale = scale + 0.2 * (abs(residual) - scale)
            else:
                self._scale = scale + 0.05 * (min(abs(residual), 2.0 * scale) - scale)
        d = self._decay
        for i in range(_N):
            xi = x[i] * weight
            self._xty[i] = self._xty[i] * d + xi * y
            row = self._xtx[i]
            for j in range(_N):
                row[j] = row[j] * d + xi * x[j]
        if busy:
            self._busy_windows = self._busy_windows * d + 1.0
        self._beta = _nonnegative_solve(self._xtx, self._xty)
        model = EnergyModel(*(b / s for b, s in zip(self._beta, _SCALE, strict=True)))
        error = self._abs_res / self._abs_y if self._abs_y > 0 else None
        trusted = (
            self._busy_windows >= self.min_windows
            and error is not None
            and error <= self.max_error
            and model.floor_w + model.idle_w > 0.0
            and (model.decode_j > 0.0 or model.context_j > 0.0)
        )
        self.state = FitState(model, trusted, error, self._busy_windows)


def _nonnegative_solve(xtx: list[list[float]], xty: list[float]) -> list[float]:
    """Least squares with every coefficient >= 0 (energy terms cannot be negative): solve, drop
    the most negative term, solve again (a few rounds at most). A small ridge keeps terms that
    the data cannot tell apart (always busy: idle vs floor) finite and shared."""
    free = list(range(_N))
    ridge = 1e-6 * max(1e-12, sum(xtx[i][i] for i in range(_N)) / _N)
    while free:
        a = [[xtx[i][j] + (ridge if i == j else 0.0) for j in free] for i in free]
        b = [xty[i] for i in free]
        solved = _gauss(a, b)
        if solved is None:
            break
        worst = min(range(len(free)), key=lambda k: solved[k])
        if solved[worst] >= 0.0:
            out = [0.0] * _N
            for k, i in enumerate(free):
                out[i] = solved[k]
            return out
        del free[worst]
    return [0.0] * _N


def _gauss(a: list[list[float]], b: list[float]) -> list[float] | None:
    n = len(b)
    m = [[*row, rhs] for row, rhs in zip(a, b, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-300 or not math.isfinite(m[pivot][col]):
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            if f:
                for c in range(col, n + 1):
                    m[r][c] -= f * m[col][c]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (m[r][n] - sum(m[r][c] * out[c] for c in range(r + 1, n))) / m[r][r]
    return out
