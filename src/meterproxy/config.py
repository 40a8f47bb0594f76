"""YAML configuration compiled once into frozen values.

Validation collects every problem, each named by its key path
(`upstreams[0].timeouts.idle: expected a positive number, got -1`), and unknown keys are
rejected so that a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .energy.settings import EnergySettings, parse_energy
from .errors import ConfigError
from .export.settings import Export, parse_export
from .policy import Tenancy, parse_tenancy
from .pricing import ModelPrice, PriceTable, UpstreamPrice, default_table
from .quota_settings import QuotaBackendSettings, parse_quota_backend
from .validation import Checker, show
from .value.settings import ValueSettings, parse_value

UPSTREAM_KINDS = ("vllm", "trtllm", "openai", "generic")
# Upstream kinds that understand `stream_options.include_usage`.
USAGE_STREAM_KINDS = frozenset({"vllm", "trtllm", "openai"})
WILDCARD = "*"
SQLITE_URL = "sqlite:///"


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 10.0
    # Until response headers arrive; for a non-streamed request that is the whole generation.
    first_byte_s: float = 600.0
    # Longest silence between two chunks of a response body.
    idle_s: float = 300.0


@dataclass(frozen=True)
class Upstream:
    name: str
    url: str  # its /v1 base, no trailing slash
    kind: str = "generic"
    models: tuple[str, ...] = (WILDCARD,)
    api_key_env: str | None = None
    api_key: str | None = field(default=None, repr=False)
    timeouts: Timeouts = Timeouts()
    gpus: tuple[int | str, ...] = ()
    refresh_interval_s: float = 30.0
    # The engine's Prometheus counters (vllm: its /metrics beside /v1), for reconciliation.
    metrics_url: str | None = None

    @property
    def discovers_models(self) -> bool:
        return WILDCARD in self.models

    @property
    def static_models(self) -> tuple[str, ...]:
        return tuple(m for m in self.models if m != WILDCARD)


@dataclass(frozen=True)
class ClientTimeouts:
    # An idle keep-alive connection is closed after this long.
    keepalive_s: float = 15.0
    # A new connection must deliver its first request line and headers within this.
    headers_s: float = 10.0
    # A request body must arrive whole within this (else 408 and the connection closes).
    body_s: float = 60.0


@dataclass(frozen=True)
class Server:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 32 * 1024 * 1024
    drain_timeout_s: float = 30.0
    # How long /readyz reports unready before the listener closes on SIGTERM.
    unready_delay_s: float = 0.5
    timeouts: ClientTimeouts = ClientTimeouts()
    # Client connections held at once; more are closed as they arrive (counted).
    max_connections: int = 1024
    # One upstream SSE event (or line) larger than this is an upstream error.
    max_sse_event_bytes: int = 4 * 1024 * 1024
    # Processes serving the port (SO_REUSEPORT), one energy sampler and local quota for all.
    workers: int = 1


@dataclass(frozen=True)
class Ledger:
    path: str = "meterproxy-usage.db"  # relative: in the state directory (--data-dir)
    enabled: bool = True
    url: str | None = None  # postgresql://...: one ledger for a fleet
    # Rows held in memory while the ledger is unavailable; beyond, they spill to a local
    # SQLite file (default: beside the SQLite ledger, or meterproxy-ledger-spill.db).
    max_queue_rows: int = 200_000
    spill_path: str | None = None

    @property
    def store_url(self) -> str:
        return self.url or f"{SQLITE_URL}{self.path}"

    @property
    def spill_file(self) -> str:
        if self.spill_path:
            return self.spill_path
        if self.url:
            return "meterproxy-ledger-spill.db"
        return str(Path(self.path).with_suffix("")) + "-spill.db"


@dataclass(frozen=True)
class StatusPage:
    """`/ui`: how much history the proxy keeps in memory for its charts, and how often."""

    history_s: float = 900.0
    interval_s: float = 2.0


@dataclass(frozen=True)
class Telemetry:
    """OpenTelemetry GenAI metrics over OTLP/HTTP; off while `otlp_endpoint` is None."""

    otlp_endpoint: str | None = None  # the collector's base URL; /v1/metrics is appended
    export_interval_s: float = 10.0


@dataclass(frozen=True)
class Reconcile:
    """How often the engines' own counters are read, and the window drift is measured over."""

    interval_s: float = 15.0
    window_s: float = 300.0


@dataclass(frozen=True)
class Settings:
    server: Server
    upstreams: tuple[Upstream, ...]
    aliases: Mapping[str, str] = field(default_factory=dict)
    prices: PriceTable = field(default_factory=default_table)
    ledger: Ledger = Ledger()
    tenancy: Tenancy = field(default_factory=Tenancy)
    energy: EnergySettings = field(default_factory=EnergySettings)
    ui: StatusPage = StatusPage()
    telemetry: Telemetry = Telemetry()
    export: Export = field(default_factory=Export)
    reconcile: Reconcile = Reconcile()
    value: ValueSettings = field(default_factory=ValueSettings)
    quota: QuotaBackendSettings = field(default_factory=QuotaBackendSettings)
    source: str = "<built-in>"


def load(path: str | Path, environ: Mapping[str, str]) -> Settings:
    """Read and validate a config file; raises ConfigError listing every problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the file ({exc.strerror})"]) from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML ({exc})"]) from None
    return parse(tree, environ, source=str(path))


def parse(tree: Any, environ: Mapping[str, str], *, source: str = "<memory>") -> Settings:
    check = Checker()
    top = check.mapping(
        tree,
        "",
        (
            "listen",
            "server",
            "upstreams",
            "aliases",
            "pricing",
            "ledger",
            "auth",
            "tenants",
            "quota",
            "energy",
            "ui",
            "telemetry",
            "export",
            "reconcile",
            "value",
        ),
    )
    listen = check.mapping(top.get("listen"), "listen", ("host", "port"))
    server_tree = check.mapping(
        top.get("server"),
        "server",
        (
            "max_body_bytes",
            "drain_timeout_s",
            "unready_delay_s",
            "timeouts",
            "max_connections",
            "max_sse_event_bytes",
            "workers",
        ),
    )
    defaults = Server()
    client = check.mapping(
        server_tree.get("timeouts"), "server.timeouts", ("keepalive_s", "headers_s", "body_s")
    )
    dt = ClientTimeouts()
    unready = server_tree.get("unready_delay_s")
    server = Server(
        host=check.string(listen.get("host"), "listen.host", defaults.host) or defaults.host,
        port=check.integer(listen.get("port"), "listen.port", defaults.port, 0, 65535),
        max_body_bytes=check.integer(
            server_tree.get("max_body_bytes"),
            "server.max_body_bytes",
            defaults.max_body_bytes,
            1,
            2**40,
        ),
        drain_timeout_s=check.positive(
            server_tree.get("drain_timeout_s"), "server.drain_timeout_s", defaults.drain_timeout_s
        ),
        unready_delay_s=0.0
        if unready == 0
        else check.positive(unready, "server.unready_delay_s", defaults.unready_delay_s),
        timeouts=ClientTimeouts(
            keepalive_s=check.positive(
                client.get("keepalive_s"), "server.timeouts.keepalive_s", dt.keepalive_s
            ),
            headers_s=check.positive(
                client.get("headers_s"), "server.timeouts.headers_s", dt.headers_s
            ),
            body_s=check.positive(client.get("body_s"), "server.timeouts.body_s", dt.body_s),
        ),
        max_connections=check.integer(
            server_tree.get("max_connections"),
            "server.max_connections",
            defaults.max_connections,
            1,
            1_000_000,
        ),
        max_sse_event_bytes=check.integer(
            server_tree.get("max_sse_event_bytes"),
            "server.max_sse_event_bytes",
            defaults.max_sse_event_bytes,
            1024,
            2**31,
        ),
        workers=check.integer(
            server_tree.get("workers"), "server.workers", defaults.workers, 1, 256
        ),
    )

    upstreams = _upstreams(check, top.get("upstreams"), environ)
    aliases = _aliases(check, top.get("aliases"), upstreams)
    prices = _pricing(check, top.get("pricing"), upstreams)
    ledger = _ledger(check, top.get("ledger"))
    tenancy = parse_tenancy(check, top, environ)
    energy = parse_energy(check, top.get("energy"))
    ui = _ui(check, top.get("ui"))
    telemetry = _telemetry(check, top.get("telemetry"))
    export = parse_export(check, top.get("export"), environ)
    reconcile = _reconcile(check, top.get("reconcile"))
    value = parse_value(check, top.get("value"), environ)
    quota = parse_quota_backend(check, top.get("quota"))
    if check.problems:
        raise ConfigError(check.problems)
    return Settings(
        server=server,
        upstreams=upstreams,
        aliases=aliases,
        prices=prices,
        ledger=ledger,
        tenancy=tenancy,
        energy=energy,
        ui=ui,
        telemetry=telemetry,
        export=export,
        reconcile=reconcile,
        value=value,
        quota=quota,
        source=source,
    )


def _ledger(check: Checker, value: Any) -> Ledger:
    tree = check.mapping(
        value, "ledger", ("url", "path", "enabled", "max_queue_rows", "spill_path")
    )
    d = Ledger()
    enabled = tree.get("enabled", True)
    if not isinstance(enabled, bool):
        check.fail("ledger.enabled", f"expected true or false, got {show(enabled)}")
    path = check.string(tree.get("path"), "ledger.path")
    url = check.string(tree.get("url"), "ledger.url")
    if url is not None and url.startswith(SQLITE_URL) and len(url) > len(SQLITE_URL):
        if path is not None:
            check.fail("ledger.url", "give ledger.url or ledger.path, not both")
        path, url = url[len(SQLITE_URL) :], None
    elif url is not None and not url.startswith(("postgresql://", "postgres://")):
        check.fail(
            "ledger.url",
            "expected sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE, got "
            f"a URL starting {url.split(':', 1)[0]!r}",
        )
    elif url is not None and not _installed("psycopg"):
        check.fail("ledger.url", "needs the PostgreSQL driver: pip install 'meterproxy[postgres]'")
    return Ledger(
        path=path or d.path,
        enabled=enabled is not False,
        url=url,
        max_queue_rows=check.integer(
            tree.get("max_queue_rows"), "ledger.max_queue_rows", d.max_queue_rows, 1, 10**8
        ),
        spill_path=check.string(tree.get("spill_path"), "ledger.spill_path"),
    )


def _ui(check: Checker, value: Any) -> StatusPage:
    tree = check.mapping(value, "ui", ("history_s", "interval_s"))
    d = StatusPage()
    ui = StatusPage(
        history_s=check.positive(tree.get("history_s"), "ui.history_s", d.history_s),
        interval_s=check.positive(tree.get("interval_s"), "ui.interval_s", d.interval_s),
    )
    if ui.history_s < ui.interval_s:
        check.fail("ui.history_s", f"must be at least ui.interval_s ({ui.interval_s:g})")
    elif ui.history_s / ui.interval_s > 100_000:
        check.fail("ui.history_s", "keeps over 100,000 snapshots; raise ui.interval_s")
    return ui


def _reconcile(check: Checker, value: Any) -> Reconcile:
    tree = check.mapping(value, "reconcile", ("interval_s", "window_s"))
    d = Reconcile()
    return Reconcile(
        interval_s=check.positive(tree.get("interval_s"), "reconcile.interval_s", d.interval_s),
        window_s=check.positive(tree.get("window_s"), "reconcile.window_s", d.window_s),
    )


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _telemetry(check: Checker, value: Any) -> Telemetry:
    tree = check.mapping(value, "telemetry", ("otlp_endpoint", "export_interval_s"))
    d = Telemetry()
    endpoint = check.string(tree.get("otlp_endpoint"), "telemetry.otlp_endpoint")
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        check.fail(
            "telemetry.otlp_endpoint",
            f"expected the collector's OTLP/HTTP URL (http://host:4318), got {endpoint!r}",
        )
    elif endpoint is not None and not _installed("opentelemetry.exporter.otlp.proto.http"):
        check.fail(
            "telemetry.otlp_endpoint",
            "needs the OpenTelemetry SDK and OTLP exporter: pip install 'meterproxy[otel]'",
        )
    interval = check.positive(
        tree.get("export_interval_s"), "telemetry.export_interval_s", d.export_interval_s
    )
    return Telemetry(otlp_endpoint=endpoint, export_interval_s=interval)


def _pricing(check: Checker, value: Any, upstreams: tuple[Upstream, ...]) -> PriceTable:
    table = default_table()
    tree = check.mapping(value, "pricing", ("models", "upstreams"))
    models = dict(table.models)
    for name, price in check.entries(tree.get("models"), "pricing.models").items():
        path = f"pricing.models.{name}"
        p = check.mapping(price, path, ("input", "cached_input", "output"))
        if "input" not in p or "output" not in p:
            check.fail(path, "expected {input: USD per 1M tokens, output: ..., cached_input: ...}")
            continue
        inp = check.non_negative(p["input"], f"{path}.input")
        models[str(name)] = ModelPrice(
            input=inp,
            cached_input=check.non_negative(p.get("cached_input", inp), f"{path}.cached_input"),
            output=check.non_negative(p["output"], f"{path}.output"),
        )
    names = {u.name for u in upstreams}
    local: dict[str, UpstreamPrice] = {}
    for name, price in check.entries(tree.get("upstreams"), "pricing.upstreams").items():
        path = f"pricing.upstreams.{name}"
        if name not in names:
            check.fail(
                path, f"no upstream is named {name!r} (upstreams: {', '.join(sorted(names))})"
            )
            continue
        p = check.mapping(price, path, ("gpu_hour_usd", "electricity_usd_per_kwh"))
        if "gpu_hour_usd" not in p:
            check.fail(f"{path}.gpu_hour_usd", "required (USD per GPU-hour)")
            continue
        local[name] = UpstreamPrice(
            gpu_hour_usd=check.non_negative(p["gpu_hour_usd"], f"{path}.gpu_hour_usd"),
            electricity_usd_per_kwh=check.non_negative(
                p.get("electricity_usd_per_kwh", 0), f"{path}.electricity_usd_per_kwh"
            ),
        )
    return PriceTable(models=models, upstreams=local, taken=table.taken, source=table.source)


def _upstreams(check: Checker, value: Any, environ: Mapping[str, str]) -> tuple[Upstream, ...]:
    if not isinstance(value, list) or not value:
        check.fail("upstreams", f"expected a non-empty list of upstreams, got {show(value)}")
        return ()
    result: list[Upstream] = []
    seen: set[str] = set()
    keys = (
        "name",
        "url",
        "kind",
        "models",
        "api_key_env",
        "timeouts",
        "gpus",
        "refresh_interval_s",
        "metrics_url",
    )
    for i, item in enumerate(value):
        path = f"upstreams[{i}]"
        tree = check.mapping(item, path, keys)
        name = check.string(tree.get("name"), f"{path}.name")
        if name is None:
            check.fail(f"{path}.name", "required")
        elif name in seen:
            check.fail(f"{path}.name", f"duplicate upstream name {name!r}")
        seen.add(name or "")
        url = check.string(tree.get("url"), f"{path}.url")
        if url is None:
            check.fail(f"{path}.url", "required (the upstream's /v1 base URL)")
        elif not url.startswith(("http://", "https://")):
            check.fail(f"{path}.url", f"expected an http:// or https:// URL, got {url!r}")
        kind = tree.get("kind", "generic")
        if kind not in UPSTREAM_KINDS:
            check.fail(
                f"{path}.kind", f"expected one of {', '.join(UPSTREAM_KINDS)}, got {show(kind)}"
            )
        models = tree.get("models", [WILDCARD])
        if (
            not isinstance(models, list)
            or not models
            or not all(isinstance(m, str) and m for m in models)
        ):
            check.fail(
                f"{path}.models", f'expected a list of model names or ["*"], got {show(models)}'
            )
            models = [WILDCARD]
        key_env = check.string(tree.get("api_key_env"), f"{path}.api_key_env")
        api_key = None
        if key_env is not None:
            api_key = environ.get(key_env)
            if not api_key:
                check.fail(
                    f"{path}.api_key_env",
                    f"environment variable {key_env} is not set; "
                    "export it with the upstream's API key",
                )
        t = check.mapping(
            tree.get("timeouts"), f"{path}.timeouts", ("connect", "first_byte", "idle")
        )
        d = Timeouts()
        timeouts = Timeouts(
            connect_s=check.positive(t.get("connect"), f"{path}.timeouts.connect", d.connect_s),
            first_byte_s=check.positive(
                t.get("first_byte"), f"{path}.timeouts.first_byte", d.first_byte_s
            ),
            idle_s=check.positive(t.get("idle"), f"{path}.timeouts.idle", d.idle_s),
        )
        gpus = tree.get("gpus", [])
        if not isinstance(gpus, list) or not all(
            (isinstance(g, int) and not isinstance(g, bool) and g >= 0)
            or (isinstance(g, str) and g)
            for g in gpus
        ):
            check.fail(f"{path}.gpus", f"expected a list of GPU indices or UUIDs, got {show(gpus)}")
            gpus = []
        refresh = check.positive(tree.get("refresh_interval_s"), f"{path}.refresh_interval_s", 30.0)
        metrics_url = check.string(tree.get("metrics_url"), f"{path}.metrics_url")
        if metrics_url is not None and not metrics_url.startswith(("http://", "https://")):
            check.fail(
                f"{path}.metrics_url", f"expected an http:// or https:// URL, got {metrics_url!r}"
            )
        if name and url:
            result.append(
                Upstream(
                    name=name,
                    url=url.rstrip("/"),
                    kind=str(kind),
                    models=tuple(models),
                    api_key_env=key_env,
                    api_key=api_key,
                    timeouts=timeouts,
                    gpus=tuple(gpus),
                    refresh_interval_s=refresh,
                    metrics_url=metrics_url,
                )
            )
    return tuple(result)


def _aliases(check: Checker, value: Any, upstreams: tuple[Upstream, ...]) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        check.fail("aliases", f"expected a mapping of alias -> model, got {show(value)}")
        return {}
    static = {m for u in upstreams for m in u.static_models}
    can_check = not any(u.discovers_models for u in upstreams)
    aliases: dict[str, str] = {}
    for alias, target in value.items():
        path = f"aliases.{alias}"
        if not isinstance(alias, str) or not isinstance(target, str) or not target:
            check.fail(path, f"expected a model name, got {show(target)}")
        elif alias == target:
            check.fail(path, "an alias cannot point at itself")
        elif can_check and target not in static:
            check.fail(
                path,
                f"model {target!r} is not served by any upstream "
                f"(known: {', '.join(sorted(static))})",
            )
        else:
            aliases[alias] = target
    return aliases


def quick_start(upstream_url: str, *, kind: str = "vllm") -> Settings:
    """`serve --upstream URL`: one upstream serving whatever its /v1/models lists."""
    upstream = Upstream(name="default", url=upstream_url.rstrip("/"), kind=kind)
    return Settings(server=Server(), upstreams=(upstream,), source="--upstream")


def in_data_dir(settings: Settings, data_dir: str | Path) -> Settings:
    """Relative ledger and quota-state paths are kept in the state directory, never wherever
    the proxy happens to be started; absolute ones stay as they are."""
    base = Path(data_dir).expanduser()

    def place(path: str) -> str:
        return path if Path(path).is_absolute() else str(base / path)

    ledger = dataclasses.replace(settings.ledger, path=place(settings.ledger.path))
    ledger = dataclasses.replace(ledger, spill_path=place(ledger.spill_file))
    tenancy = dataclasses.replace(settings.tenancy, state_path=place(settings.tenancy.state_path))
    ce = settings.export.cloudevents
    export = dataclasses.replace(
        settings.export, cloudevents=dataclasses.replace(ce, spill_path=place(ce.spill_path))
    )
    return dataclasses.replace(settings, ledger=ledger, tenancy=tenancy, export=export)


def with_listen(settings: Settings, host: str | None, port: int | None) -> Settings:
    server = settings.server
    server = dataclasses.replace(
        server, host=host or server.host, port=server.port if port is None else port
    )
    return dataclasses.replace(settings, server=server)


def with_workers(settings: Settings, workers: int) -> Settings:
    return dataclasses.replace(
        settings, server=dataclasses.replace(settings.server, workers=workers)
    )
