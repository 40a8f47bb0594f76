"""Model name -> upstream, from the config's model lists, the upstreams' own /v1/models
listings (for `models: ["*"]`) and aliases. A Router is immutable; discovery builds a new one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import Settings, Upstream


@dataclass(frozen=True, slots=True)
class Route:
    upstream: Upstream
    model: str  # canonical model name: what the upstream serves, and the metrics label


class Router:
    def __init__(self, settings: Settings, discovered: Mapping[str, tuple[dict[str, Any], ...]]):
        """`discovered`: upstream name -> the model objects its /v1/models listed."""
        self.settings = settings
        self.discovered = discovered
        routes: dict[str, Route] = {}
        listing: list[dict[str, Any]] = []
        for upstream in settings.upstreams:
            for name in upstream.static_models:
                if name not in routes:
                    routes[name] = Route(upstream, name)
                    listing.append(
                        {"id": name, "object": "model", "created": 0, "owned_by": upstream.name}
                    )
        for upstream in settings.upstreams:
            if not upstream.discovers_models:
                continue
            for obj in discovered.get(upstream.name, ()):
                name = obj["id"]
                if name not in routes:
                    routes[name] = Route(upstream, name)
                    listing.append(obj)
        for alias, target in settings.aliases.items():
            route = routes.get(target)
            if route is not None and alias not in routes:
                routes[alias] = route
                listing.append(
                    {
                        "id": alias,
                        "object": "model",
                        "created": 0,
                        "owned_by": route.upstream.name,
                        "root": target,
                    }
                )
        self._routes = routes
        self.listing = tuple(listing)

    def resolve(self, model: str) -> Route | None:
        return self._routes.get(model)

    def model_object(self, model: str) -> dict[str, Any] | None:
        for obj in self.listing:
            if obj["id"] == model:
                return obj
        return None

    @property
    def default_upstream(self) -> Upstream:
        return self.settings.upstreams[0]


def parse_model_list(body: Any) -> tuple[dict[str, Any], ...] | None:
    """The model objects of an OpenAI /v1/models body, or None if it is not one."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return None
    models = tuple(
        obj
        for obj in body["data"]
        if isinstance(obj, dict) and isinstance(obj.get("id"), str) and obj["id"]
    )
    return models
