"""The attribution engine: measured GPU energy split among requests, exactly. Pure: times and
readings are passed in; nothing here does I/O or reads a clock.

Per GPU, each sampling interval (t0, t1] carries its measured energy E (counter delta). The
work of each request in flight inside it comes from `workload` (residency, prefill, decode,
decode x context). The GPU's energy model (calibration.py: idle, engine floor, per-token
terms) predicts the interval as

    idle part   idle_w x (time with nothing in the engine)       -> idle, nobody's
    static      (idle_w + floor_w) x busy time                    -> split by residency
    dynamic     prefill_j x p + decode_j x d + context_j x c      -> each request its own

and E is split in those proportions (scaled so they sum to E). The fit is used from the first
busy window (it starts from the defaults and moves each term as the data pins it down, see
calibration.py) unless it has been shown to predict badly; before that, or with calibration off,
the configured defaults apply: the static level is the idle baseline (a low percentile of idle
power), and whatever E holds above it is split by relative work weights. Conservation is exact
per GPU: attributed + idle == measured. The same shares split the interval's busy time into
GPU-seconds.

Edges: energy above idle in the first empty interval after requests ended is theirs (the
counter lags their work); a reading that jumps past the board limit (two counter updates in
one interval) is carried into the next intervals, not dropped; a counter that goes backwards
drops that interval (a gap).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .calibration import Calibration, EnergyModel, FitState, Prior
from .workload import NEVER, Group, Habits, Pace, Share


@dataclass(frozen=True)
class Weights:
    """Defaults: used before a GPU's fit has seen work, and as the fit's starting point."""

    # Relative energy of one prompt token and one generated token. Prefill is compute-bound
    # and batched (~20-40 mJ/token for an 8B model on an H100-class GPU); a decode step streams
    # all weights for one token per sequence (~0.4-1 J/token at typical batch sizes).
    prefill: float = 0.03
    decode: float = 1.0
    # Per decoded token per 1000 tokens of its context (reading its KV cache). Left to the
    # fit: the KV bytes an 8B-70B GQA model reads per 1000 tokens of context are 0.07-0.5 of
    # the weight bytes a decoded token's share of a step streams, depending on model and batch,
    # and some engines show no context cost at all; a guess either way costs more than it saves.
    context: float = 0.0
    # What the weights above weigh in the fit, in busy windows: a tie-breaker for what the data
    # cannot yet tell apart, not a belief (on a GPU unlike the one they came from they are
    # wrong, and even one window's weight would hold its fit back).
    prior_windows: float = 0.001
    # Prefill time per uncached prompt token (25k tokens/s), until streams show the real speed.
    prefill_s_per_token: float = 0.00004
    step_s: float = 0.025  # decode step time, until streams show it
    # Of the static energy during the engine time prefill takes, the part that goes to the
    # prefilling requests (the rest is shared by residency).
    prefill_time_share: float = 0.5
    baseline_percentile: float = 0.1  # of power seen while idle: the static (idle) level
    default_baseline_w: float = 0.0  # until an idle interval has been seen
    calibrate: bool = True  # fit each GPU's model online and use it


# Shares an interval's closing looks at between two steps (see `Engine.submit`): ~3 us each,
# so a step holds the event loop ~0.1 ms, where closing a busy interval whole took ~1 ms.
SHARES_PER_STEP = 32
_MAX_CARRY_S = 2.0  # energy above the board limit is carried at most this long's worth
_FIT_LIMIT_W = 1.3  # x board limit: what one interval can plausibly hold


@dataclass
class GpuBook:
    gpu: str
    pace: Pace
    fit: Calibration
    t_ns: int | None = None
    e_mj: int | None = None
    measured_mj: int = 0
    idle_mj: float = 0.0
    attributed_mj: float = 0.0
    gaps: int = 0  # intervals dropped: counter reset or missing
    clamped: int = 0  # readings past any plausible power: dropped as a glitch
    carry_mj: int = 0  # measured above the board limit, spread over the next intervals
    live: dict[str, Share] = field(default_factory=dict)  # in flight
    # Live shares that may still be in the prefill queue, oldest first (a subset of `live`).
    # Leaving the queue is for good (prefill only shrinks; a first token and an end come
    # once), so `start` drops the ones that left from the front while it asks "is the queue
    # empty?": O(1) amortized, where looking at every live share cost O(in flight + ended this
    # interval) a request (~12 us a request at 16 in flight).
    queued: dict[str, Share] = field(default_factory=dict)
    # Live shares `_place` may still have to look at, in `live`'s order (a subset): leaving
    # for good too (reached by the queue, prompt placed, and a first token or an end seen), so
    # an interval's placing looks only at the requests that came lately, not at every stream.
    placing: dict[str, Share] = field(default_factory=dict)
    ended: set[str] = field(default_factory=set)  # live, with an end
    glow: dict[str, Share] = field(default_factory=dict)  # ended last interval
    done: dict[str, Share] = field(default_factory=dict)  # final, not yet read
    idle_power_w: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=600)
    )
    power_w: float = 0.0
    _baseline: tuple[int, float] = (-1, 0.0)  # (samples seen, percentile) cache
    _idle_median: tuple[int, float] = (-1, 0.0)  # (samples seen, median) cache


class Engine:
    def __init__(self, weights: Weights, board_w: Callable[[str], float | None]) -> None:
        self.weights = weights
        self._board_w = board_w  # the GPU's power limit
        self.books: dict[str, GpuBook] = {}
        # Keys whose share some GPU made final since the last `take_final` (a request is final
        # once all of its GPUs have): the tracker looks at these, not at every parked request.
        # It drains them at every reading; a caller that never does (a benchmark's scenario)
        # holds one key per request per GPU here until it drops the engine.
        self._final: list[str] = []
        # Readings submitted whose intervals are not closed yet, oldest first (see `submit`).
        self._closing: collections.deque[Iterator[None]] = collections.deque()
        self.habits: dict[Group, Habits] = {}
        # Live attribution by group since the last drain (for counters that stay current).
        self.live_mj: collections.defaultdict[Group, float] = collections.defaultdict(float)

    def book(self, gpu: str) -> GpuBook:
        found = self.books.get(gpu)
        if found is None:
            w = self.weights
            pace = Pace(w.step_s * 1e9, 1.0 / (w.prefill_s_per_token * 1e9))
            prior = Prior(w.prefill / w.decode, w.context / w.decode, w.prior_windows)
            found = self.books[gpu] = GpuBook(gpu, pace, Calibration(prior=prior))
        return found

    def fit(self, gpu: str) -> FitState:
        return self.book(gpu).fit.state

    # -- request events ---------------------------------------------------------------------

    def start(
        self,
        key: str,
        gpus: tuple[str, ...],
        group: Group,
        t_ns: int,
        prompt_tokens: int,
        streamed: bool,
    ) -> None:
        """A request reaches the upstream. Its prefill is queued behind earlier ones."""
        habits = self.habits.get(group)
        if habits is None:
            habits = self.habits[group] = Habits()
        prompt = prompt_tokens * habits.prompt_ratio
        uncached = prompt * (1.0 - habits.cached_share)
        for gpu in gpus:
            book = self.book(gpu)
            if _queue_empty(book):
                pace = book.pace
                pace.period_ns, pace.period_tok, pace.period_tok_per_ns = t_ns, 0.0, 0.0
            share = Share(group, streamed, t_ns, prompt_tokens, prompt, uncached)
            book.live[key] = book.queued[key] = book.placing[key] = share

    def first_token(self, key: str, gpus: tuple[str, ...], t_ns: int) -> None:
        """Prefill is over: it cannot have been more than the time since the start allows."""
        for gpu in gpus:
            book = self.books[gpu]
            share = book.live.get(key)
            if share is None or share.first_ns is not None:
                continue
            share.first_ns = share.prefill_end_ns = t_ns
            pace = book.pace
            share.head_ns = max(share.started_ns, pace.last_first_ns)
            pace.last_first_ns = max(pace.last_first_ns, t_ns)
            speed = max(pace.prefill_tok_per_ns, pace.period_tok_per_ns)
            bound = 1.5 * speed * (t_ns - share.started_ns)
            share.prefill_left = max(0.0, min(share.prefill_left, bound - share.prefill_placed))

    def decoded(self, key: str, gpus: tuple[str, ...], t_ns: int, tokens: int) -> None:
        for gpu in gpus:
            book = self.books[gpu]
            share = book.live.get(key)
            if share is None or tokens <= 0:
                continue
            share.seen += tokens
            share.tokens.append((t_ns, share.seen))
            if share.last_token_ns is not None:
                book.pace.step_sample((t_ns - share.last_token_ns) / tokens, streamed=True)
            share.last_token_ns = t_ns

    def usage(
        self,
        key: str,
        gpus: tuple[str, ...],
        prompt: int | None,
        cached: int | None,
        completion: int | None,
    ) -> None:
        """The upstream's own counts: they correct the request's remaining work and teach the
        estimates used for the next requests."""
        for k, gpu in enumerate(gpus):
            book = self.books[gpu]
            share = book.live.get(key)
            if share is None:
                continue
            if k == 0:
                self.habits[share.group].learn(share.estimate, prompt, cached)
            if prompt:
                uncached = prompt - (cached or 0)
                share.prompt = float(prompt)
                share.prefill_left = max(
                    0.0, min(share.prefill_left, uncached - share.prefill_placed)
                )
                if share.first_ns is not None:
                    book.pace.speed_sample(uncached, share.first_ns - share.head_ns)
            if completion is not None:
                share.completion = completion

    def end(self, key: str, gpus: tuple[str, ...], t_ns: int) -> None:
        for gpu in gpus:
            book = self.books[gpu]
            share = book.live.get(key)
            if share is not None and share.end_ns is None:
                share.end_ns = t_ns
                book.ended.add(key)
                if not share.streamed and share.completion and share.prefill_end_ns < t_ns:
                    decode_ns = share.end_ns - share.prefill_end_ns
                    book.pace.step_sample(decode_ns / share.completion, streamed=False)

    def finished(self, key: str, gpus: tuple[str, ...]) -> tuple[float, float] | None:
        """(energy mJ, GPU-ns) once every GPU has closed the interval after the request's
        end, else None. The request is forgotten once read."""
        total_mj = total_ns = 0.0
        for gpu in gpus:
            share = self.books[gpu].done.get(key)
            if share is None:
                return None
            total_mj += share.energy_mj
            total_ns += share.gpu_ns
        for gpu in gpus:
            del self.books[gpu].done[key]
        return total_mj, total_ns

    def take_final(self) -> list[str]:
        """The keys some GPU made final since the last call (each request once per GPU)."""
        final, self._final = self._final, []
        return final

    def abandon(self, key: str, gpus: tuple[str, ...]) -> tuple[float, float]:
        """What a request has so far, when its GPUs stopped reporting; it is forgotten."""
        self.finish_closing()  # an interval still closing may hold its share
        total_mj = total_ns = 0.0
        for gpu in gpus:
            book = self.books[gpu]
            book.ended.discard(key)
            book.queued.pop(key, None)
            book.placing.pop(key, None)
            share = book.live.pop(key, None) or book.glow.pop(key, None) or book.done.pop(key, None)
            if share is not None:
                total_mj += share.energy_mj
                total_ns += share.gpu_ns
        return total_mj, total_ns

    # -- readings ---------------------------------------------------------------------------

    def reading(self, gpu: str, t_ns: int, energy_mj: int) -> None:
        """A cumulative counter reading; closes the interval since the previous one, now."""
        self.submit(gpu, t_ns, energy_mj)
        self.finish_closing()

    def submit(self, gpu: str, t_ns: int, energy_mj: int) -> None:
        """A reading whose interval `step` closes a few shares at a time (readings close in the
        order submitted). Request events may come between two steps; they happened after the
        reading was taken. The closing keeps the engine's pace as it was when it began, and
        the shares live then; a share's own event (its usage, its end) counts in this interval
        if it came before the share's step, as it would have had the reading reached the loop
        that much later. Conservation is exact either way."""
        self._closing.append(self._read(gpu, t_ns, energy_mj))

    @property
    def closing(self) -> int:
        """How many submitted readings' intervals are not closed yet."""
        return len(self._closing)

    def step(self) -> bool:
        """Close up to `SHARES_PER_STEP` more shares of the oldest submitted interval; whether
        any submitted interval is still open."""
        closing = self._closing
        if not closing:
            return False
        ended: bool | None = next(closing[0], True)  # a closing yields None between steps
        if ended:
            closing.popleft()
        return bool(closing)

    def finish_closing(self) -> None:
        """Close every submitted interval now."""
        while self.step():
            pass

    def _read(self, gpu: str, t_ns: int, energy_mj: int) -> Iterator[None]:
        book = self.book(gpu)
        if book.t_ns is None or book.e_mj is None:
            book.t_ns, book.e_mj = t_ns, energy_mj
            yield from self._close(book, t_ns, 0, 0, counted=False)
            return
        dt = t_ns - book.t_ns
        if dt <= 0:
            return
        delta = energy_mj - book.e_mj
        book.e_mj = energy_mj
        if delta < 0:  # counter reset (driver reload): this interval is unknown
            book.gaps += 1
            yield from self._close(book, t_ns, dt, 0, counted=False)
            return
        board = self._board_w(gpu)
        if board is not None:
            delta = self._smooth(book, delta, board * _FIT_LIMIT_W * dt / 1e6, board)
        book.power_w = delta * 1e6 / dt
        yield from self._close(book, t_ns, dt, delta, counted=True)

    def _smooth(self, book: GpuBook, delta: int, most: float, board_w: float) -> int:
        """A counter that updates slower than it is read lands two updates in one interval:
        what exceeds the board limit is real and waits for the next intervals."""
        delta += book.carry_mj
        book.carry_mj = 0
        if delta > most:
            book.carry_mj = delta - int(most)
            delta = int(most)
            if book.carry_mj > board_w * _MAX_CARRY_S * 1000:  # no counter lags that much
                book.clamped += 1
                book.carry_mj = 0
        return delta

    def _close(
        self, book: GpuBook, t1: int, dt: int, energy: int, *, counted: bool
    ) -> Iterator[None]:
        """Close (t1 - dt, t1], yielding every `SHARES_PER_STEP` shares. The shares are those
        live when it began: one that starts later has nothing in the interval."""
        t0 = t1 - dt
        pace = book.pace
        if dt:
            pace.interval_ns += (dt - pace.interval_ns) // 8
        if not book.live:  # nothing in the engine (most intervals of an idle GPU)
            if counted:
                book.measured_mj += energy
                if self.weights.calibrate:
                    book.fit.add(dt / 1e9, 0.0, 0.0, 0.0, 0.0, 0.0, energy / 1000)
            self._idle(book, dt, energy, counted)
            book.t_ns = t1
            return
        rows: list[tuple[Share, int, float, float]] = []  # share, residency, raw work, prefill
        spans: list[tuple[int, int]] = []
        busy = residency = 0
        prefill_sum = decode_sum = context_sum = 0.0
        steps = 0.0  # engine steps: every decoding stream gets one token per step
        model = self._model(book)
        w = self.weights
        if model is not None:
            wp, wd, wc = model.prefill_j * 1000, model.decode_j * 1000, model.context_j * 1000
        else:
            wp, wd, wc = w.prefill, w.decode, w.context
        if dt:
            self._place(book, t0, t1)
        # The engine's pace as it stands now: events between two steps (a token's gap, a
        # prefill's speed) teach the live one, not this interval's closing.
        step_ns, prefill_tok_per_ns = pace.step_ns, pace.prefill_tok_per_ns
        shares = list(book.live.values())
        for k in range(0, len(shares), SHARES_PER_STEP):
            if k:
                yield None
            for share in shares[k : k + SHARES_PER_STEP]:
                res, p, d, c = share.advance(t0, t1, step_ns)
                if res == 0 and p == 0.0 and d == 0.0:
                    continue
                rows.append((share, res, wp * p + wd * d + wc * c, p))
                residency += res
                prefill_sum += p
                decode_sum += d
                context_sum += c
                if d > steps and share.streamed:
                    steps = d
                if res and busy < dt:
                    if res == dt:
                        busy = dt
                    else:
                        spans.append((max(share.enter_ns, t0), min(share.end_ns or t1, t1)))
        if busy < dt and spans:
            busy = _union(spans)
        if not steps:
            steps = busy / step_ns
        if counted:
            book.measured_mj += energy
            if self.weights.calibrate:
                book.fit.add(
                    dt / 1e9, busy / 1e9, steps, prefill_sum, decode_sum, context_sum, energy / 1000
                )
        if not rows:
            self._idle(book, dt, energy, counted)
        else:
            yield from self._split(
                book, rows, residency, dt, busy, steps, energy, model, prefill_tok_per_ns
            )
            self._make_final(book)
        if book.ended:
            for key in [k for k in book.ended if book.live[k].end_ns <= t1]:  # type: ignore[operator]
                book.glow[key] = book.live.pop(key)
                book.queued.pop(key, None)
                book.placing.pop(key, None)
                book.ended.discard(key)
        book.t_ns = t1

    def _place(self, book: GpuBook, t0: int, t1: int) -> None:
        """The prefill each queued request did in (t0, t1], and when the queue reached it (its
        residency starts there). The engine works through the queue first come first served at
        its prefill speed, whatever the prompt sizes, so the prefill an interval holds follows
        from the time the queue was busy in it, not from when each prompt's first token came.
        A first token (or the end) shows that request's prefill, and every earlier one's, done
        by then; the queue never runs ahead of what has arrived. The speed is the learned one,
        or faster when the current period's first tokens show it was."""
        pace = book.pace
        queue = []  # not yet reached, prompt left to place, or a stream without its first token
        left = []
        for key, s in book.placing.items():
            if (
                s.enter_ns == NEVER
                or s.prefill_left > 0.0
                or (s.streamed and s.first_ns is None and s.end_ns is None)
            ):
                if s.started_ns < t1:
                    queue.append(s)
            else:
                left.append(key)
        for key in left:
            del book.placing[key]
        if not queue:
            return
        shown = [_done_at(share, t1) for share in queue]
        last_done, closed = -1, t1  # the last request shown done, and when
        for k, done in enumerate(shown):
            if done is not None:
                last_done, closed = k, done
        speed = max(pace.prefill_tok_per_ns, pace.period_tok_per_ns)
        clock = t0  # how far the engine's prefill has come, in time
        behind = pace.period_tok  # the period's prefill queued ahead of this request
        for k, share in enumerate(queue):
            if share.started_ns > clock:
                clock = share.started_ns
            if k <= last_done:
                own = shown[k]
                done = closed if own is None or own > closed else own
                if done < t0:
                    done = t0  # an event seen after its interval closed
                if share.enter_ns == NEVER:
                    share.enter_ns = min(clock, done)
                part = share.prefill_left
                if share.first_ns is None:  # done by a later first token, or by its end
                    bound = 1.5 * speed * (done - share.started_ns) - share.prefill_placed
                    part = max(0.0, min(part, bound))
                    share.prefill_left = part
                # the next prompt started no later than this one was done, maybe earlier
                clock = min(clock + int(part / speed), done)
            else:
                if share.enter_ns == NEVER:
                    share.enter_ns = min(clock, t1)
                part = min(share.prefill_left, speed * max(t1 - clock, 0))
                clock += int(part / speed)
            share.prefill_left -= part
            share.prefill_placed += part
            share.prefill_now = part
            behind += share.prefill_placed
            if k <= last_done:
                pace.period_tok += share.prefill_placed
                first = share.first_ns
                if first is not None and first > pace.period_ns:
                    # all this was prefilled by its first token: the engine is at least this fast
                    pace.period_tok_per_ns = max(
                        pace.period_tok_per_ns, behind / (first - pace.period_ns)
                    )
            if share.prefill_left <= 0.0 and share.prefill_end_ns == NEVER:
                share.prefill_end_ns = min(clock, t1)
            if clock >= t1 and k >= last_done:
                break

    def _idle(self, book: GpuBook, dt: int, energy: int, counted: bool) -> None:
        """Nothing in the engine: idle, except what the counter still owed the requests that
        just ended (above the idle level)."""
        glow = book.glow
        if glow and energy and dt:
            idle_w = self._idle_w(book)
            owed = max(energy - idle_w * dt / 1e6, 0.0)
            if owed:
                # In proportion to what each drew in its last interval: that is what lags.
                spent = sum(s.last_mj for s in glow.values())
                for share in glow.values():
                    part = owed * (share.last_mj / spent if spent else 1.0 / len(glow))
                    share.energy_mj += part
                    self.live_mj[share.group] += part
                book.attributed_mj += owed
        else:
            owed = 0.0
        self._make_final(book)
        book.idle_mj += energy - owed
        if counted and dt and not book.live:
            book.idle_power_w.append(energy * 1e6 / dt)

    def _make_final(self, book: GpuBook) -> None:
        """The requests that ended in the interval before the one just closed are final here
        (the counter has caught up with their work)."""
        glow = book.glow
        if glow:
            book.done.update(glow)
            self._final.extend(glow)
            glow.clear()

    def _split(
        self,
        book: GpuBook,
        rows: list[tuple[Share, int, float, float]],
        residency: int,
        dt: int,
        busy: int,
        steps: float,
        energy: int,
        model: EnergyModel | None,
        prefill_tok_per_ns: float,
    ) -> Iterator[None]:
        work = sum([r[2] for r in rows])
        if model is not None:
            # The idle part of the interval is idle at the level the fit says: only what the
            # requests drew takes the fit's error (scaled so the whole adds up to the reading).
            # Never above the idle power seen, though: a young fit whose idle level is too high
            # would take what the requests drew for idle.
            idle_w = min(model.idle_w, self._idle_seen_w(book, model.idle_w))
            idle = min(idle_w * (dt - busy) / 1e6, energy)
            static = (model.idle_w + model.floor_w) * busy / 1e6 + model.step_j * steps * 1000
            scale = (energy - idle) / (static + work) if static + work > 0 else 0.0
            static, dynamic = static * scale, work * scale
        else:
            level = self._baseline_w(book)
            idle, static = level * (dt - busy) / 1e6, level * busy / 1e6
            if energy >= idle + static:
                dynamic = energy - idle - static
            else:
                scale = energy / (idle + static)
                idle, static, dynamic = idle * scale, static * scale, 0.0
        if not work:
            static, dynamic = static + dynamic, 0.0
        if not residency:
            static, dynamic = 0.0, dynamic + static
        total = static + dynamic
        attributed = energy - idle if total > 0.0 else 0.0
        static, dynamic = (
            static * attributed / (total or 1.0),
            dynamic * attributed / (total or 1.0),
        )
        book.idle_mj += energy - attributed
        book.attributed_mj += attributed
        prefill = sum([r[3] for r in rows])
        by_prefill = 0.0
        if prefill and busy and static:
            # The engine time prefill took (at the learned speed): residency says everyone
            # resident shares its static energy, work says the prompts that took it pay. The
            # two conventions differ most here; half of it goes each way.
            t_prefill = min(busy, prefill / prefill_tok_per_ns)
            by_prefill = static * self.weights.prefill_time_share * t_prefill / busy
            static -= by_prefill
        per_res = static / residency if residency else 0.0
        per_work = dynamic / work if work else 0.0
        per_prefill = by_prefill / prefill if prefill else 0.0
        per_mj_ns = busy / attributed if attributed else 0.0
        live = self.live_mj
        for k in range(0, len(rows), SHARES_PER_STEP):
            if k:
                yield None
            for share, res, mine, p in rows[k : k + SHARES_PER_STEP]:
                got = per_res * res + per_work * mine + per_prefill * p
                share.last_mj = got
                share.energy_mj += got
                share.gpu_ns += got * per_mj_ns
                live[share.group] += got

    def _model(self, book: GpuBook) -> EnergyModel | None:
        state = book.fit.state
        return state.model if state.usable else None

    def _idle_w(self, book: GpuBook) -> float:
        model = self._model(book)
        return model.idle_w if model is not None else self._baseline_w(book)

    def _idle_seen_w(self, book: GpuBook, otherwise: float) -> float:
        """The median power of the idle intervals seen (`otherwise` before any)."""
        seen = book.idle_power_w
        if not seen:
            return otherwise
        count = len(seen)
        if book._idle_median[0] != count or count == seen.maxlen:
            ordered = sorted(seen)
            book._idle_median = (count, ordered[count // 2])
        return book._idle_median[1]

    def _baseline_w(self, book: GpuBook) -> float:
        seen = book.idle_power_w
        if not seen:
            return self.weights.default_baseline_w
        count = len(seen)
        if book._baseline[0] != count or count == seen.maxlen:
            ordered = sorted(seen)
            book._baseline = (count, ordered[int(self.weights.baseline_percentile * (count - 1))])
        return book._baseline[1]

    def drain_live(self) -> dict[Group, float]:
        live, self.live_mj = self.live_mj, collections.defaultdict(float)
        return live


def _queue_empty(book: GpuBook) -> bool:
    """Whether no live share is in the prefill queue; drops the front ones that left it."""
    queued, live = book.queued, book.live
    left = []
    empty = True
    for key, share in queued.items():
        if _queued(share) and live.get(key) is share:
            empty = False
            break
        left.append(key)
    for key in left:
        del queued[key]
    return empty


def _queued(share: Share) -> bool:
    """Still in the prefill queue: prompt left to place, or a stream without its first token."""
    return share.end_ns is None and (
        share.prefill_left > 0.0 or (share.streamed and share.first_ns is None)
    )


def _done_at(share: Share, t_ns: int) -> int | None:
    """When its prefill was shown done (its first token, else its end), if by `t_ns`."""
    at = share.first_ns
    if at is not None and at <= t_ns:
        return at
    at = share.end_ns
    if at is not None and at <= t_ns:
        return at
    return None


def _union(spans: list[tuple[int, int]]) -> int:
    spans.sort()
    total, (lo, hi) = 0, spans[0]
    for a, b in spans[1:]:
        if a > hi:
            total += hi - lo
            lo, hi = a, b
        elif b > hi:
            hi = b
    return total + hi - lo
