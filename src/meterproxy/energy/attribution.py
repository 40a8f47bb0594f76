"""The attribution engine: measured GPU energy split among requests, exactly. Pure: times and
readings are passed in; nothing here does I/O or reads a clock.

Per GPU, each sampling interval [t0, t1] carries its measured energy E (counter delta):

- nothing in flight on the GPU's upstreams during the interval: E is idle energy;
- otherwise a static part, min(E, baseline power x dt), is split by residency (time in the
  engine: from the first token minus the estimated prefill, to the end), and the rest (dynamic)
  by work: prefill tokens x `prefill_weight` + decode tokens x `decode_weight` in the interval.
  With no work in the interval the dynamic part follows residency too; with no resident either,
  E is split evenly among the requests in flight.

Conservation is exact per GPU: attributed + idle == measured. The same weights split the
interval's duration, giving each request's GPU-seconds. Cost follows events, not requests x
intervals: requests resident for a whole interval share one running sum (S), and only requests
that entered, left or did work during an interval are visited when it closes.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

Group = Hashable  # what live metrics are keyed by: (model, upstream, tenant)


@dataclass(frozen=True)
class Weights:
    # Relative energy of one prompt token and one generated token. Prefill is compute-bound
    # and batched (~20-40 mJ/token for an 8B model on an H100-class GPU); a decode step streams
    # all weights for one token per sequence (~0.4-1 J/token at typical batch sizes).
    prefill: float = 0.03
    decode: float = 1.0
    # Prefill time per prompt token (25k tokens/s): when prefill work happens, first come
    # first served, and so when a request entered the engine.
    prefill_s_per_token: float = 0.00004
    baseline_percentile: float = 0.1  # of power seen while idle: the static (idle) level
    default_baseline_w: float = 0.0  # until an idle interval has been seen


@dataclass
class _Share:
    """One request on one GPU."""

    group: Group
    started_ns: int
    entered_ns: int | None = None  # in the engine since (None: queued or waiting)
    full_since_s: tuple[float, float] | None = None  # (S_energy, S_time) when it became full
    partial_ns: int = 0  # residency inside the open interval, when not full for all of it
    work: float = 0.0  # weighted work inside the open interval
    prefill_left: float = 0.0  # prefill work not yet placed in an interval
    prefill_begin_ns: int = 0  # when its prefill is estimated to start (after earlier ones)
    prefill_end_ns: int = 0  # ...and to finish
    ended_ns: int | None = None
    energy_mj: float = 0.0
    gpu_ns: float = 0.0


@dataclass
class GpuBook:
    gpu: str
    t_ns: int | None = None
    e_mj: int | None = None
    measured_mj: int = 0
    idle_mj: int = 0
    attributed_mj: float = 0.0
    gaps: int = 0  # intervals dropped: counter reset or missing
    clamped: int = 0  # readings above 1.3 x board power, clamped
    shares: dict[object, _Share] = field(default_factory=dict)  # in flight this interval
    done: dict[object, _Share] = field(default_factory=dict)  # ended, final, not yet read
    full: dict[object, _Share] = field(default_factory=dict)  # resident for the whole interval
    touched: dict[object, _Share] = field(default_factory=dict)  # entered/left/worked inside
    full_groups: collections.Counter[Group] = field(default_factory=collections.Counter)
    s_energy: float = 0.0  # running sum: static energy per full resident (mJ)
    s_time: float = 0.0  # running sum: GPU time per full resident (ns)
    prefill_free_ns: int = 0  # estimated end of the prefills already queued on this GPU
    idle_power_w: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=600)
    )
    power_w: float = 0.0


class Engine:
    def __init__(self, weights: Weights, board_w: Callable[[str], float | None]) -> None:
        self.weights = weights
        self._board_w = board_w  # the GPU's power limit, for clamping impossible readings
        self.books: dict[str, GpuBook] = {}
        # Live attribution by group since the last drain (for counters that stay current).
        self.live_mj: collections.defaultdict[Group, float] = collections.defaultdict(float)

    def book(self, gpu: str) -> GpuBook:
        found = self.books.get(gpu)
        if found is None:
            found = self.books[gpu] = GpuBook(gpu)
        return found

    # -- request events ---------------------------------------------------------------------

    def start(
        self, rid: object, gpus: tuple[str, ...], group: Group, t_ns: int, prompt_tokens: int
    ) -> None:
        """A request reaches the upstream. Its prefill is work spread over its estimated
        prefill time: engines prefill new prompts first come, first served, in chunks beside
        the running decodes. Whatever is left is placed at the first token."""
        prefill_ns = max(int(prompt_tokens * self.weights.prefill_s_per_token * 1e9), 1)
        for gpu in gpus:
            book = self.book(gpu)
            share = _Share(group, t_ns)
            share.prefill_left = prompt_tokens * self.weights.prefill
            share.prefill_begin_ns = max(t_ns, book.prefill_free_ns)
            share.prefill_end_ns = book.prefill_free_ns = share.prefill_begin_ns + prefill_ns
            # In the engine from its (estimated) prefill on; the time before that is queueing.
            share.entered_ns = share.prefill_begin_ns
            book.shares[rid] = share
            book.touched[rid] = share

    def first_token(
        self, rid: object, gpus: tuple[str, ...], prompt_tokens: int, t_ns: int
    ) -> None:
        """Residency starts at the first token minus the estimated prefill; prefill is work."""
        prefill_ns = int(prompt_tokens * self.weights.prefill_s_per_token * 1e9)
        for gpu in gpus:
            book = self.books[gpu]
            share = book.shares.get(rid)
            if share is None:
                continue
            floor = max(share.started_ns, book.t_ns if book.t_ns is not None else t_ns)
            estimate = max(t_ns - prefill_ns, floor)
            if share.entered_ns is None or (
                share.full_since_s is None and share.entered_ns > estimate
            ):
                share.entered_ns = estimate  # the prefill queue was shorter than estimated
            share.work += share.prefill_left
            share.prefill_left = 0.0
            book.touched[rid] = share

    def decoded(self, rid: object, gpus: tuple[str, ...], tokens: int) -> None:
        for gpu in gpus:
            book = self.books[gpu]
            share = book.shares.get(rid)
            if share is not None:
                share.work += tokens * self.weights.decode
                book.touched[rid] = share

    def end(self, rid: object, gpus: tuple[str, ...], t_ns: int) -> None:
        for gpu in gpus:
            book = self.books[gpu]
            share = book.shares.get(rid)
            if share is None or share.ended_ns is not None:
                continue
            share.ended_ns = t_ns
            if rid in book.full:  # its full intervals so far, from the running sums
                del book.full[rid]
                book.full_groups[share.group] -= 1
                assert share.full_since_s is not None
                share.energy_mj += book.s_energy - share.full_since_s[0]
                share.gpu_ns += book.s_time - share.full_since_s[1]
                share.full_since_s = None
            book.touched[rid] = share

    def finished(self, rid: object, gpus: tuple[str, ...]) -> tuple[float, float] | None:
        """(energy mJ, GPU-ns) once every GPU has a sample past the request's end, else None.
        The request is forgotten once read."""
        total_mj = total_ns = 0.0
        for gpu in gpus:
            share = self.books[gpu].done.get(rid)
            if share is None:
                return None
            total_mj += share.energy_mj
            total_ns += share.gpu_ns
        for gpu in gpus:
            del self.books[gpu].done[rid]
        return total_mj, total_ns

    def abandon(self, rid: object, gpus: tuple[str, ...]) -> tuple[float, float]:
        """What a request has so far, when its GPUs stopped reporting; it is forgotten."""
        total_mj = total_ns = 0.0
        for gpu in gpus:
            book = self.books[gpu]
            share = book.shares.pop(rid, None) or book.done.pop(rid, None)
            book.touched.pop(rid, None)
            if book.full.pop(rid, None) is not None and share is not None:
                book.full_groups[share.group] -= 1
            if share is not None:
                if share.full_since_s is not None:
                    share.energy_mj += book.s_energy - share.full_since_s[0]
                    share.gpu_ns += book.s_time - share.full_since_s[1]
                total_mj += share.energy_mj
                total_ns += share.gpu_ns
        return total_mj, total_ns

    # -- readings ---------------------------------------------------------------------------

    def reading(self, gpu: str, t_ns: int, energy_mj: int) -> None:
        """A cumulative counter reading; closes the interval since the previous one."""
        book = self.book(gpu)
        if book.t_ns is None or book.e_mj is None:
            book.t_ns, book.e_mj = t_ns, energy_mj
            self._roll(book, t_ns)
            return
        dt = t_ns - book.t_ns
        if dt <= 0:
            return
        delta = energy_mj - book.e_mj
        book.e_mj = energy_mj
        if delta < 0:  # counter reset (driver reload): this interval is unknown
            book.gaps += 1
            self._close(book, t_ns, dt, 0, counted=False)
            return
        board = self._board_w(gpu)
        if board is not None and delta > 1.3 * board * dt / 1e6:
            delta = int(1.3 * board * dt / 1e6)
            book.clamped += 1
        book.power_w = delta * 1e6 / dt
        self._close(book, t_ns, dt, delta, counted=True)

    def _close(self, book: GpuBook, t1: int, dt: int, energy: int, *, counted: bool) -> None:
        t0 = t1 - dt
        # Requests that ended at or before t0 (their end event came after the last sample) took
        # no part in this interval.
        stale = {
            rid for rid, s in book.touched.items() if s.ended_ns is not None and s.ended_ns <= t0
        }
        active = len(book.shares) > len(stale)
        if counted:
            book.measured_mj += energy
        if not active:
            if counted:
                book.idle_mj += energy
                book.idle_power_w.append(energy * 1e6 / dt)
            self._roll(book, t1)
            return
        # Residency of the requests visited in this interval (entered, left or worked), and
        # the part of their pending prefill that falls inside it.
        partial_total = 0
        for share in book.touched.values():
            if share.prefill_left and share.prefill_begin_ns < t1:
                begin = max(t0, share.prefill_begin_ns)
                part = min(1.0, (t1 - begin) / max(share.prefill_end_ns - begin, 1))
                share.work += share.prefill_left * part
                share.prefill_left -= share.prefill_left * part
            if share.full_since_s is not None or share.entered_ns is None:
                share.partial_ns = 0
                continue
            start = max(share.entered_ns, t0)
            stop = min(share.ended_ns if share.ended_ns is not None else t1, t1)
            share.partial_ns = max(stop - start, 0)
            partial_total += share.partial_ns
        residency = len(book.full) * dt + partial_total
        work = sum(s.work for s in book.touched.values())
        static = min(energy, self._baseline_w(book) * dt / 1e6) if residency else 0.0
        if not residency and not work:
            static = 0.0
        # fractions of E (and of dt) that go by residency and by work
        by_residency = (static + (energy - static if not work else 0.0)) if energy else 0.0
        frac_res = (by_residency / energy) if energy else (1.0 if residency else 0.0)
        if residency:
            per_ns_e = by_residency / residency
            per_ns_t = frac_res * dt / residency
            book.s_energy += per_ns_e * dt
            book.s_time += per_ns_t * dt
            for group, count in book.full_groups.items():
                if count:
                    self.live_mj[group] += per_ns_e * dt * count
            book.attributed_mj += per_ns_e * residency
            for share in book.touched.values():
                if share.partial_ns:
                    share.energy_mj += per_ns_e * share.partial_ns
                    share.gpu_ns += per_ns_t * share.partial_ns
                    self.live_mj[share.group] += per_ns_e * share.partial_ns
        dynamic = energy - by_residency
        if work:
            for share in book.touched.values():
                if share.work:
                    part = share.work / work
                    share.energy_mj += dynamic * part
                    share.gpu_ns += (1.0 - frac_res) * dt * part
                    self.live_mj[share.group] += dynamic * part
            book.attributed_mj += dynamic
        elif not residency:
            # In flight but neither resident nor working (queued): split evenly among them.
            queued = [s for rid, s in book.shares.items() if rid not in stale]
            n = len(queued)
            for share in queued:
                share.energy_mj += energy / n
                share.gpu_ns += dt / n
                self.live_mj[share.group] += energy / n
            book.attributed_mj += energy
        self._roll(book, t1)

    def _roll(self, book: GpuBook, t1: int) -> None:
        """Start the next interval: residents become full, ended requests close."""
        pending = {}
        for rid, share in list(book.touched.items()):
            share.work = 0.0
            share.partial_ns = 0
            if share.prefill_left and share.ended_ns is None:
                pending[rid] = share  # its prefill continues into the next interval
            if share.ended_ns is not None:
                book.done[rid] = book.shares.pop(rid)
            elif share.entered_ns is not None and share.entered_ns > t1:
                pending[rid] = share  # not in the engine yet (waiting for its prefill)
            elif share.entered_ns is not None and rid not in book.full:
                book.full[rid] = share
                book.full_groups[share.group] += 1
                share.full_since_s = (book.s_energy, book.s_time)
        book.touched.clear()
        book.touched.update(pending)
        book.t_ns = t1

    def _baseline_w(self, book: GpuBook) -> float:
        seen = book.idle_power_w
        if not seen:
            return self.weights.default_baseline_w
        ordered = sorted(seen)
        return ordered[int(self.weights.baseline_percentile * (len(ordered) - 1))]

    def drain_live(self) -> dict[Group, float]:
        live, self.live_mj = self.live_mj, collections.defaultdict(float)
        return live
