"""Energy attribution against the GPU twin's truth, per scenario, in virtual time.

    python benchmarks/energy_accuracy.py

Per-request error = |attributed - true| / true; "naive" is the usual shortcut (the run's average
joules per token x the request's tokens). "long p90" covers requests of 2 s or more.
"""

from __future__ import annotations

from meterproxy.energy.scenarios import run, scenarios


def main() -> None:
    print(
        "| scenario | requests | conservation error mJ | aggregate error | p50 | p90 | max | "
        "long p90 | naive p50 | naive p90 | energy unknown |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in scenarios():
        r = run(s)
        print(
            f"| {r.name} | {r.requests} | {r.conservation_mj:.6f} | {r.aggregate_error:.2%} | "
            f"{r.p50:.1%} | {r.p90:.1%} | {r.max:.1%} | {r.long_p90:.1%} | "
            f"{r.naive_p50:.1%} | {r.naive_p90:.1%} | {r.unknown} |"
        )


if __name__ == "__main__":
    main()
