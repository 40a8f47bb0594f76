"""Model name -> upstream: static lists in config order, models discovered from `["*"]`
upstreams, aliases onto either, and the default upstream for everything unrouted."""

from __future__ import annotations

from typing import Any

from meterproxy import config
from meterproxy.config import Settings
from meterproxy.routing import Router, parse_model_list


def settings(upstreams: list[dict[str, Any]], aliases: dict[str, str] | None = None) -> Settings:
    tree: dict[str, Any] = {"upstreams": upstreams}
    if aliases is not None:
        tree["aliases"] = aliases
    return config.parse(tree, {})


def up(name: str, *models: str) -> dict[str, Any]:
    return {"name": name, "url": f"http://127.0.0.1:9/{name}/v1", "models": list(models)}


def model(name: str, owner: str = "vllm") -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 1700000000, "owned_by": owner}


def served_by(router: Router, name: str) -> str | None:
    route = router.resolve(name)
    return route.upstream.name if route is not None else None


def test_static_lists_route_to_the_first_upstream_that_lists_a_model() -> None:
    router = Router(settings([up("a", "m1", "shared"), up("b", "shared", "m2")]), {})
    assert served_by(router, "m1") == "a"
    assert served_by(router, "m2") == "b"
    assert served_by(router, "shared") == "a"
    assert router.resolve("m3") is None
    assert [m["id"] for m in router.listing] == ["m1", "shared", "m2"]
    assert router.model_object("m2") == {
        "id": "m2",
        "object": "model",
        "created": 0,
        "owned_by": "b",
    }
    assert router.model_object("m3") is None


def test_discovered_models_route_to_wildcard_upstreams_and_never_shadow_static_ones() -> None:
    s = settings([up("static", "m1"), up("wild", "*"), up("fixed", "m9")])
    discovered = {
        "wild": (model("m1"), model("d1"), model("d2")),
        "fixed": (model("ignored"),),  # listed by an upstream whose models are fixed
        "gone": (model("x"),),  # an upstream not in the settings
    }
    router = Router(s, discovered)
    assert served_by(router, "m1") == "static"
    route = router.resolve("d2")
    assert route is not None and route.upstream.name == "wild" and route.model == "d2"
    assert router.resolve("ignored") is None and router.resolve("x") is None
    # A discovered model's object is listed as its upstream wrote it.
    assert router.model_object("d1") == model("d1")
    assert [m["id"] for m in router.listing] == ["m1", "m9", "d1", "d2"]
    assert router.discovered is discovered


def test_an_alias_routes_to_its_target_under_the_canonical_name() -> None:
    s = settings([up("a", "llama-3-8b"), up("b", "*")], {"fast": "llama-3-8b", "big": "d-70b"})
    router = Router(s, {"b": (model("d-70b"),)})
    fast, big = router.resolve("fast"), router.resolve("big")
    assert fast is not None and fast.model == "llama-3-8b" and fast.upstream.name == "a"
    assert big is not None and big.model == "d-70b" and big.upstream.name == "b"
    assert fast == router.resolve("llama-3-8b")
    assert router.model_object("fast") == {
        "id": "fast",
        "object": "model",
        "created": 0,
        "owned_by": "a",
        "root": "llama-3-8b",
    }


def test_an_alias_whose_target_is_not_there_yet_is_not_routed_until_it_is() -> None:
    s = settings([up("b", "*")], {"big": "d-70b"})
    assert Router(s, {}).resolve("big") is None
    assert Router(s, {}).model_object("big") is None
    later = Router(s, {"b": (model("d-70b"),)})
    assert later.resolve("big") is not None


def test_a_served_model_is_never_shadowed_by_an_alias_of_the_same_name() -> None:
    s = settings([up("b", "*"), up("a", "real")], {"d1": "real"})
    router = Router(s, {"b": (model("d1"),)})
    route = router.resolve("d1")
    assert route is not None and route.upstream.name == "b" and route.model == "d1"
    assert [m["id"] for m in router.listing].count("d1") == 1


def test_the_default_upstream_is_the_first_configured() -> None:
    s = settings([up("first", "*"), up("second", "m")])
    assert Router(s, {}).default_upstream.name == "first"


def test_parse_model_list_keeps_only_model_objects_with_an_id() -> None:
    body = {"object": "list", "data": [model("a"), {"id": ""}, {"id": 3}, "b", {"object": "m"}]}
    assert parse_model_list(body) == (model("a"),)
    assert parse_model_list({"object": "list", "data": []}) == ()
    assert parse_model_list({"data": {"id": "a"}}) is None
    assert parse_model_list([model("a")]) is None
    assert parse_model_list(None) is None
