"""Config validation: every problem named by its key path; check-config's output and exit."""

from __future__ import annotations

from pathlib import Path

import pytest

from meterproxy import cli, config
from meterproxy.errors import ConfigError

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
        "ledger, auth, tenants, quota, energy)",
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
