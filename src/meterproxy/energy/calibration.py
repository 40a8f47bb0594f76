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
the fit.

The fit starts from the configured defaults (`Prior`): no engine floor or per-step term above
idle, prefill and context costing fixed fractions of a decoded token. Each statement is added to
the normal matrix with the weight of `windows` typical busy windows (a ridge centred on the
defaults, not on zero), so a direction the data pins down moves from the first window while one
it cannot yet tell apart (a single window; a floor beside per-step energy; prefill before any
prompt was seen) stays where the defaults put it. The model is `usable` (attribution uses it)
from the first busy window unless it has been shown to predict badly (past `max_error` once
backed by `min_windows`), and `trusted` once `min_windows` busy windows have been predicted
within `max_error` (out of sample: each window is scored before it is learned): trusted says the
data, not the defaults, backs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from operator import mul

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
class Prior:
    """The configured defaults as a statement about the fit: no energy above idle but the
    tokens' (no floor, no per-step term), a prefilled token and context (per decoded token per
    1000 tokens) costing these fractions of a decoded token's whole energy above idle. Each of
    the four weighs as much as `windows` typical busy windows."""

    prefill_per_decode: float = 0.03
    context_per_decode: float = 0.0
    windows: float = 0.001


@dataclass(frozen=True)
class FitState:
    """What the metrics and `meterproxy energy` show."""

    model: EnergyModel | None  # the latest fit (None before the first solve)
    trusted: bool  # backed by data: `min_windows` busy windows predicted within `max_error`
    error_ratio: float | None  # robust out-of-sample error / mean window energy
    windows: float  # effective number of busy windows in the fit
    usable: bool = False  # attribution uses `model` (else the configured defaults)


class Calibration:
    def __init__(
        self,
        window_s: float = 1.0,
        half_life_windows: float = 900.0,
        min_windows: int = 10,
        max_error: float = 0.15,
        error_half_life_windows: float = 30.0,
        prior: Prior | None = None,
    ) -> None:
        self.window_s, self.min_windows, self.max_error = window_s, min_windows, max_error
        self.prior = prior or Prior()
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
            residual = y - sum(map(mul, self._beta, x))
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
        xtx, xty = self._xtx, self._xty
        for i in range(_N):
            xi = x[i] * weight
            xty[i] = xty[i] * d + xi * y
            xtx[i] = [v * d + xi * xj for v, xj in zip(xtx[i], x, strict=True)]
        if busy:
            self._busy_windows = self._busy_windows * d + 1.0
        self._beta = beta = _nonnegative_solve(self._with_prior(), xty)
        model = EnergyModel(*[b / s for b, s in zip(beta, _SCALE, strict=True)])
        error = self._abs_res / self._abs_y if self._abs_y > 0 else None
        # Tokens must explain some of the energy: with the prior, a term the data does not
        # support is small but never exactly 0. XtX's first row holds each feature's sum (x dt).
        sums = xtx[0]
        total = sum(map(mul, beta, sums))
        work = sum([beta[3] * sums[3], beta[4] * sums[4], beta[5] * sums[5]])
        sane = model.floor_w + model.idle_w > 0.0 and total > 0.0 and work >= 0.02 * total
        backed = self._busy_windows >= self.min_windows
        good = error is None or error <= self.max_error
        usable = sane and self._busy_windows > 0.0 and (good or not backed)
        trusted = usable and backed and error is not None
        self.state = FitState(model, trusted, error, self._busy_windows, usable)

    def _with_prior(self) -> list[list[float]]:
        """The normal matrix plus the prior: each statement `a . beta = 0` adds
        m x (a . x)^2 x a a^T, with (a . x)^2 averaged over the busy windows seen, so that it
        weighs as m typical windows whatever the GPU's scale, and nothing before any work."""
        n = self._busy_windows
        x = self._xtx
        xtx = [row[:] for row in x]
        if n <= 0.0:
            return xtx
        m = self.prior.windows
        for terms in self._statements():
            typical = sum([ai * aj * x[i][j] for i, ai in terms for j, aj in terms])
            weight = m * typical / n
            for i, ai in terms:
                row = xtx[i]
                wa = weight * ai  # (weight x a_i) x a_j, as the sum is written
                for j, aj in terms:
                    row[j] += wa * aj
        return xtx

    def _statements(self) -> tuple[tuple[tuple[int, float], ...], ...]:
        """The defaults as linear statements on the scaled coefficients ((index, factor)...)."""
        x = self._xtx
        # Busy time and steps per decoded token, as seen (least squares through 0), scaled.
        busy_per = x[1][4] / x[4][4] if x[4][4] > 0 else 0.0
        steps_per = x[2][4] / x[4][4] if x[4][4] > 0 else 0.0

        def all_in(k: int, ratio: float) -> tuple[tuple[int, float], ...]:
            # coef_k = ratio x (decode_j + floor_w x busy/token + step_j x steps/token): the
            # defaults' weights are relative to a decoded token's whole energy above idle
            r = ratio * _SCALE[k] / _SCALE[4]
            return ((k, 1.0), (4, -r), (1, -r * busy_per), (2, -r * steps_per))

        p = self.prior
        return (
            ((1, 1.0),),  # floor_w = 0: the defaults' static level is idle
            ((2, 1.0),),  # step_j = 0
            all_in(3, p.prefill_per_decode),
            all_in(5, p.context_per_decode),
        )


def _nonnegative_solve(xtx: list[list[float]], xty: list[float]) -> list[float]:
    """Least squares with every coefficient >= 0 (energy terms cannot be negative): solve, drop
    the most negative term, solve again (a few rounds at most). A small ridge keeps terms that
    the data cannot tell apart (always busy: idle vs floor) finite and shared."""
    ridge = 1e-6 * max(1e-12, sum([xtx[i][i] for i in range(_N)]) / _N)
    # The system with every term, built once: a later round takes its rows and columns of the
    # terms still free (the same numbers a rebuild would compute), not new sums.
    full = [[*row, rhs] for row, rhs in zip(xtx, xty, strict=True)]
    for i in range(_N):
        full[i][i] += ridge
    free = list(range(_N))
    m = [row[:] for row in full]
    while True:
        solved = _gauss(m)
        if solved is None:
            break
        worst = min(range(len(free)), key=solved.__getitem__)
        if solved[worst] >= 0.0:
            if len(free) == _N:
                return solved
            out = [0.0] * _N
            for k, i in enumerate(free):
                out[i] = solved[k]
            return out
        del free[worst]
        if not free:
            break
        keep = [*free, _N]
        m = [[row[j] for j in keep] for row in (full[i] for i in free)]
    return [0.0] * _N


def _gauss(m: list[list[float]]) -> list[float] | None:
    """Solves the augmented system `m` (n rows of n coefficients and the right-hand side) by
    elimination with partial pivoting, in place."""
    n = len(m)
    for col in range(n):
        pivot, largest = col, abs(m[col][col])  # the first of the largest, as max() picks it
        for r in range(col + 1, n):
            size = abs(m[r][col])
            if size > largest:
                pivot, largest = r, size
        if largest < 1e-300 or not math.isfinite(m[pivot][col]):
            return None
        m[col], m[pivot] = m[pivot], m[col]
        top = m[col]
        for r in range(col + 1, n):
            row = m[r]
            f = row[col] / top[col]
            if f:
                # (column `col` of the rows below is left as it is: nothing reads it again)
                for c in range(col + 1, n + 1):
                    row[c] -= f * top[c]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        row = m[r]
        out[r] = (row[n] - sum([row[c] * out[c] for c in range(r + 1, n)])) / row[r]
    return out
