"""Reading a parsed YAML tree while collecting every problem, each named by its key path."""

from __future__ import annotations

from typing import Any


class Checker:
    """Collects problems while reading a parsed YAML tree."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def mapping(self, value: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {show(value)}")
            return {}
        for key in value:
            if key not in allowed:
                where = f"{path}.{key}" if path else str(key)
                self.fail(where, f"unknown key (expected one of: {', '.join(allowed)})")
        return value

    def entries(self, value: Any, path: str) -> dict[Any, Any]:
        """A mapping whose keys are names (models, upstreams, tenants), not fixed keys."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {show(value)}")
            return {}
        return value

    def string(self, value: Any, path: str, default: str | None = None) -> str | None:
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            self.fail(path, f"expected a non-empty string, got {show(value)}")
            return default
        return value

    def positive(self, value: Any, path: str, default: float) -> float:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            self.fail(path, f"expected a positive number, got {show(value)}")
            return default
        return float(value)

    def non_negative(self, value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            self.fail(path, f"expected a number >= 0, got {show(value)}")
            return 0.0
        return float(value)

    def positive_int(self, value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            self.fail(path, f"expected a positive integer, got {show(value)}")
            return 1
        return value

    def integer(self, value: Any, path: str, default: int, lo: int, hi: int) -> int:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.fail(path, f"expected an integer from {lo} to {hi}, got {show(value)}")
            return default
        return value


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
