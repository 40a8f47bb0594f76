"""Config validation: every problem named by its key path; check-config's output and exit."""

from __future__ import annotations

from pathlib import Path

import pytest

from meterproxy import cli, config
from meterproxy.errors import ConfigError
from meterproxy.policy import hash_key

GOOD = """
listen: {host: 0.0.0.0, port: 9000}
upstreams:
  - name: local-vllm
    url: http://127.0.0.1:8000/v1/
    kind: vllm
    models: ["*"]
    gpus: [0, 1]
    timeouts: {connect: 2, first_byte: 120, idle: 30}
  - name: openai
    url: https://api.openai.com/v1
    kind: openai
    models: [gpt-4o-mini]
    api_key_env: OPENAI_API_KEY
aliases:
  fast: gpt-4o-mini
"""


def test_a_full_config_compiles_to_frozen_values(tmp_path: Path) -> None:
    path = tmp_path / "meterproxy.yaml"
    path.write_text(GOOD)
    settings = config.load(path, {"OPENAI_API_KEY": "sk-test"})
    assert (settings.server.host, settings.server.port) == ("0.0.0.0", 9000)
    local, hosted = settings.upstreams
    assert local.url == "http://127.0.0.1:8000/v1" and local.discovers_models
    assert local.gpus == (0, 1) and local.timeouts.idle_s == 30
    assert hosted.api_key == "sk-test" and "sk-test" not in repr(hosted)
    assert settings.aliases == {"fast": "gpt-4o-mini"}
    with pytest.raises(AttributeError):
        local.name = "x"  # type: ignore[misc]


def problems(tree: object, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config.parse(tree, environ or {})
    return caught.value.problems


def test_every_problem_is_reported_by_key_path() -> None:
    found = problems(
        {
            "listen": {"port": 70000, "hots": "x"},
            "upstreams": [
                {"name": "a", "url": "ftp://x", "kind": "tgi", "timeouts": {"idle": -1}},
                {
                    "name": "a",
                    "url": "http://y/v1",
                    "models": [],
                    "gpus": [True],
                    "api_key_env": "MISSING_KEY",
                },
            ],
            "extra": 1,
        }
    )
    assert found == [
        "extra: unknown key (expected one of: listen, server, upstreams, aliases, pricing, "
        "ledger, auth, tenants, quota, energy, ui, telemetry, export, reconcile, value)",
        "listen.hots: unknown key (expected one of: host, port)",
        "listen.port: expected an integer from 0 to 65535, got 70000",
        "upstreams[0].url: expected an http:// or https:// URL, got 'ftp://x'",
        "upstreams[0].kind: expected one of vllm, trtllm, openai, generic, got 'tgi'",
        "upstreams[0].timeouts.idle: expected a positive number, got -1",
        "upstreams[1].name: duplicate upstream name 'a'",
        'upstreams[1].models: expected a list of model names or ["*"], got []',
        "upstreams[1].api_key_env: environment variable MISSING_KEY is not set; export it with "
        "the upstream's API key",
        "upstreams[1].gpus: expected a list of GPU indices or UUIDs, got [True]",
    ]


def test_upstreams_are_required_and_aliases_must_name_served_models() -> None:
    assert problems({}) == ["upstreams: expected a non-empty list of upstreams, got None"]
    found = problems(
        {
            "upstreams": [{"name": "a", "url": "http://x/v1", "models": ["m1"]}],
            "aliases": {"fast": "m2", "same": "same"},
        }
    )
    assert found == [
        "aliases.fast: model 'm2' is not served by any upstream (known: m1)",
        "aliases.same: an alias cannot point at itself",
    ]


def test_check_config_prints_ok_or_every_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("upstreams: [{name: a, url: 'http://127.0.0.1:8000/v1'}]\n")
    assert cli.main(["check-config", str(good)]) == 0
    assert capsys.readouterr().out == "ok\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams: [{name: a, url: 'http://x/v1', kind: nope, timeouts: {idle: 0}}]\n")
    assert cli.main(["check-config", str(bad)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "upstreams[0].kind: expected one of vllm, trtllm, openai, generic, got 'nope'",
        "upstreams[0].timeouts.idle: expected a positive number, got 0",
    ]
    broken = tmp_path / "broken.yaml"
    broken.write_text("upstreams: [\n")
    assert cli.main(["check-config", str(broken)]) == 1
    assert "not valid YAML" in capsys.readouterr().out
    assert cli.main(["check-config", str(tmp_path / "missing.yaml")]) == 1
    assert "cannot read the file" in capsys.readouterr().out


def test_the_shipped_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "meterproxy.example.yaml"
    settings = config.load(example, {})
    assert settings.upstreams[0].kind == "vllm"


def test_admin_keys_status_page_and_telemetry_sections() -> None:
    upstreams = [{"name": "a", "url": "http://127.0.0.1:8000/v1"}]
    tenants = {"research": {"keys": ["env:RESEARCH_KEY"]}}
    settings = config.parse(
        {
            "upstreams": upstreams,
            "tenants": tenants,
            "auth": {"admin_keys": [f"sha256:{hash_key('ops-key')}", "env:ADMIN_KEY"]},
            "ui": {"history_s": 300, "interval_s": 5},
            "telemetry": {"otlp_endpoint": "http://collector:4318", "export_interval_s": 30},
        },
        {"RESEARCH_KEY": "r-key", "ADMIN_KEY": "admin-from-env"},
    )
    assert settings.tenancy.admin_key_hashes == {hash_key("ops-key"), hash_key("admin-from-env")}
    assert "ops-key" not in repr(settings) and hash_key("ops-key") not in repr(settings)
    assert (settings.ui.history_s, settings.ui.interval_s) == (300, 5)
    assert settings.telemetry == config.Telemetry("http://collector:4318", 30.0)
    defaults = config.parse({"upstreams": upstreams}, {})
    assert defaults.tenancy.admin_key_hashes == frozenset()
    assert defaults.ui == config.StatusPage(900.0, 2.0)
    assert defaults.telemetry.otlp_endpoint is None

    assert problems(
        {
            "upstreams": upstreams,
            "tenants": tenants,
            "auth": {"admin_keys": ["plain-admin-key", "env:RESEARCH_KEY", "env:NOPE"]},
            "ui": {"history_s": 1, "interval_s": 2, "theme": "dark"},
            "telemetry": {"otlp_endpoint": "collector:4317", "export_interval_s": 0},
        },
        {"RESEARCH_KEY": "r-key"},
    ) == [
        "auth.admin_keys[0]: expected sha256:<64 hex digits> or env:VARIABLE (plain keys do not "
        "belong in the file; `meterproxy hash-key` prints the sha256: form)",
        "auth.admin_keys[2]: environment variable NOPE is not set",
        "auth.admin_keys: a key is also a tenant's key; give admins keys of their own",
        "ui.theme: unknown key (expected one of: history_s, interval_s)",
        "ui.history_s: must be at least ui.interval_s (2)",
        "telemetry.otlp_endpoint: expected the collector's OTLP/HTTP URL (http://host:4318), "
        "got 'collector:4317'",
        "telemetry.export_interval_s: expected a positive number, got 0",
    ]


def test_ledger_url_picks_the_backend_and_export_is_validated() -> None:
    up = [{"name": "a", "url": "http://x/v1"}]
    default = config.parse({"upstreams": up}, {}).ledger
    assert default.store_url == "sqlite:///meterproxy-usage.db"
    assert default.spill_file == "meterproxy-usage-spill.db"
    sqlite = config.parse({"upstreams": up, "ledger": {"url": "sqlite:////var/l.db"}}, {}).ledger
    assert (sqlite.path, sqlite.url, sqlite.spill_file) == ("/var/l.db", None, "/var/l-spill.db")
    pg = config.parse(
        {"upstreams": up, "ledger": {"url": "postgresql://meter@db/meter", "max_queue_rows": 10}},
        {},
    ).ledger
    assert pg.store_url == "postgresql://meter@db/meter" and pg.max_queue_rows == 10
    assert pg.spill_file == "meterproxy-ledger-spill.db"
    placed = config.in_data_dir(
        config.parse({"upstreams": up, "ledger": {"url": "postgresql://meter@db/meter"}}, {}),
        "/state",
    )
    assert placed.ledger.spill_file == "/state/meterproxy-ledger-spill.db"
    assert placed.export.cloudevents.spill_path == "/state/meterproxy-export-spill.db"
    export = config.parse(
        {
            "upstreams": up,
            "export": {"cloudevents": {"url": "http://om:8888/api/v1/events", "api_key_env": "T"}},
        },
        {"T": "om-secret"},
    ).export.cloudevents
    assert export.api_key == "om-secret" and "om-secret" not in repr(export)
    assert problems(
        {
            "upstreams": up,
            "ledger": {"url": "mysql://root:pw@db/x", "max_queue_rows": 0},
            "export": {"cloudevents": {"url": "om:8888", "api_key_env": "NOPE", "batch": 5}},
        }
    ) == [
        "ledger.url: expected sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE, got a URL "
        "starting 'mysql'",
        "ledger.max_queue_rows: expected an integer from 1 to 100000000, got 0",
        "export.cloudevents.batch: unknown key (expected one of: url, source, type, api_key_env, "
        "batch_events, interval_s, max_queue_events, timeout_s, retry_max_s, spill_path)",
        "export.cloudevents.url: expected the ingest endpoint's http:// or https:// URL "
        "(OpenMeter: http://openmeter:8888/api/v1/events), got 'om:8888'",
        "export.cloudevents.api_key_env: environment variable NOPE is not set; export it with "
        "the ingest token",
    ]
    both = {"url": "sqlite:///a.db", "path": "b.db"}
    assert problems({"upstreams": up, "ledger": both}) == [
        "ledger.url: give ledger.url or ledger.path, not both"
    ]
