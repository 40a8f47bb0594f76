"""The `value:` section of the config: when a task closes, what counts as a duplicate, the salt
that hashes prompts and user ids, and the aliases that name users in the leaderboard."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..validation import Checker, show


@dataclass(frozen=True)
class ValueSettings:
    # A task nobody rated closes (counted `unknown`) after this long without a request or report.
    task_idle_s: float = 300.0
    # A rated task closes this long after its last request or report (a correction sent within
    # it still counts; one sent later reaches the tables, not the counters).
    outcome_grace_s: float = 10.0
    # The same normalized request from the same tenant within this many seconds is a duplicate
    # (0: no duplicate detection, and no hashing).
    duplicate_window_s: float = 600.0
    # Keys the prompt and user hashes; None: generated once and kept beside the ledger.
    salt: str | None = field(default=None, repr=False)
    # Open tasks held in memory; past this the longest-idle one closes early.
    max_open_tasks: int = 100_000
    # Client `user` id -> the name the leaderboard shows (others appear as short salted hashes).
    user_aliases: Mapping[str, str] = field(default_factory=dict, repr=False)
    # TensorZero-shaped feedback with a numeric value: success when value >= this.
    success_score: float = 0.5


KEYS = (
    "task_idle_s",
    "outcome_grace_s",
    "duplicate_window_s",
    "salt",
    "max_open_tasks",
    "user_aliases",
    "success_score",
)


def parse_value(check: Checker, value: Any, environ: Mapping[str, str]) -> ValueSettings:
    tree = check.mapping(value, "value", KEYS)
    d = ValueSettings()
    salt = check.string(tree.get("salt"), "value.salt")
    if salt is not None and salt.startswith("env:"):
        name = salt[4:]
        salt = environ.get(name) or None
        if salt is None:
            check.fail("value.salt", f"environment variable {name} is not set")
    elif salt is not None and len(salt) < 16:
        check.fail("value.salt", "expected at least 16 characters (or env:VARIABLE)")
    aliases: dict[str, str] = {}
    for raw, alias in check.entries(tree.get("user_aliases"), "value.user_aliases").items():
        if not isinstance(raw, str) or not isinstance(alias, str) or not alias.strip():
            check.fail(f"value.user_aliases.{raw}", f"expected a name, got {show(alias)}")
        else:
            aliases[raw] = alias.strip()
    score = tree.get("success_score", d.success_score)
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 1:
        check.fail("value.success_score", f"expected a number from 0 to 1, got {show(score)}")
        score = d.success_score
    return ValueSettings(
        task_idle_s=check.positive(tree.get("task_idle_s"), "value.task_idle_s", d.task_idle_s),
        outcome_grace_s=check.positive(
            tree.get("outcome_grace_s"), "value.outcome_grace_s", d.outcome_grace_s
        ),
        duplicate_window_s=_window(check, tree.get("duplicate_window_s"), d.duplicate_window_s),
        salt=salt,
        max_open_tasks=check.integer(
            tree.get("max_open_tasks"), "value.max_open_tasks", d.max_open_tasks, 1, 10_000_000
        ),
        user_aliases=aliases,
        success_score=float(score),
    )


def _window(check: Checker, value: Any, default: float) -> float:
    if value is None:
        return default
    if value == 0 and not isinstance(value, bool):
        return 0.0
    return check.positive(value, "value.duplicate_window_s", default)
