"""`meterproxy leaderboard` on a ledger written row by row, its figures computed by hand."""

from __future__ import annotations

import csv as csv_module
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from meterproxy import cli, ledger
from meterproxy.exchange import Outcome
from meterproxy.store.sqlite import connect, insert_sql
from meterproxy.usage import Source, Usage
from meterproxy.value import leaderboard
from meterproxy.value.duplicates import salt_key
from meterproxy.value.store import OutcomeRow, RequestRow, SqliteStorage

from .factories import settlement

NOW = 1.8e9
SALT = "salt-for-the-leaderboard-tests"


def request(key: str, tenant: str, **changes: Any) -> tuple[object, ...]:
    values: dict[str, Any] = {
        "request_id": key,
        "tenant": tenant,
        "model": "small",
        "ts": NOW - 60,
        "usage": Usage(100, 50, None, None, Source.UPSTREAM),
        "cost_usd": 0.01,
        "energy_j": 20.0,
        **changes,
    }
    return ledger.row(settlement(**values))


def write(path: Path, rows: list[tuple[object, ...]], value: list[Any]) -> None:
    db = connect(str(path), ledger.LEDGER_SCHEMA)
    db.executemany(insert_sql(ledger.REQUESTS), rows)
    db.close()
    storage = SqliteStorage(str(path))
    storage.open(SALT)
    storage.write(value)
    storage.close()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """Tenant `good`: 2 tasks, both succeed, on `big`. Tenant `burn`: 6 requests, 4 of them
    duplicates, one task rated a success; `mixed`: a failure, a truncation, a refusal."""
    file = tmp_path / "ledger.db"
    rows = [
        request("g1", "good", model="big", cost_usd=0.05, energy_j=100.0, client_user="alice"),
        request("g2", "good", model="big", cost_usd=0.05, energy_j=100.0, client_user="alice"),
        request("g3", "good", model="small", cost_usd=0.02, energy_j=30.0, client_user="bob"),
        *(
            request(
                f"b{i}",
                "burn",
                client_user="bot",
                cost_usd=0.03,
                energy_j=60.0,
                waste_reason="duplicate" if i else None,
            )
            for i in range(5)
        ),
        request("b5", "burn", ts=NOW - 30 * 86400),  # before the period
        request("m1", "mixed", waste_reason="truncated"),
        request("m2", "mixed", status="429", outcome=Outcome.REFUSED, cost_usd=0.0),
        request("m3", "mixed", model="big"),
    ]
    value = [
        RequestRow("g1", "good", "task-1", NOW, False),
        RequestRow("g2", "good", "task-1", NOW, False),  # g3 is a task of its own
        *(RequestRow(f"b{i}", "burn", "loop", NOW, i > 0) for i in range(5)),
        OutcomeRow("good", "task-1", True, None, None, NOW, "f1"),
        OutcomeRow("good", "g3", True, 0.9, None, NOW, "f2"),
        OutcomeRow("burn", "loop", True, None, None, NOW, "f3"),
        OutcomeRow("mixed", "m3", False, None, None, NOW, "f4"),
        OutcomeRow("good", "other-tasks-outcome", False, None, None, NOW, "f5"),
    ]
    write(file, rows, value)
    return file


def board(path: Path, by: str, rank: str = "usd", aliases: dict[str, str] | None = None) -> Any:
    found = leaderboard.tasks(str(path), NOW - 7 * 86400, NOW)
    names = leaderboard.Names(leaderboard.stored_salt(str(path)) or SALT, aliases or {})
    rows = leaderboard.board(found, by, names, rank)
    return json.loads(leaderboard.render(rows, by, "json"))


def test_by_tenant_the_figures_are_every_attempt_over_the_successes(path: Path) -> None:
    rows = {r["tenant"]: r for r in board(path, "tenant")}
    good, burn, mixed = rows["good"], rows["burn"], rows["mixed"]
    assert [r["tenant"] for r in board(path, "tenant")] == ["good", "burn", "mixed"]
    assert (good["rank"], good["successes"], good["tasks"], good["success_rate"]) == (1, 2, 2, 1.0)
    assert good["usd_per_success"] == pytest.approx((0.05 + 0.05 + 0.02) / 2)
    assert good["joules_per_success"] == pytest.approx((100 + 100 + 30) / 2)
    assert good["tokens"] == 3 * 150 and good["flags"] == ""
    # burn: 5 requests in the period, 1 successful task: 5 attempts' cost per success
    assert (burn["successes"], burn["tasks"], burn["requests"]) == (1, 1, 5)
    assert burn["usd_per_success"] == pytest.approx(5 * 0.03)
    assert burn["joules_per_success"] == pytest.approx(5 * 60.0)
    assert burn["duplicate_share"] == pytest.approx(4 / 5)
    assert burn["waste_duplicate"] == pytest.approx(4 * 50 / (5 * 50))
    assert burn["flags"] == "duplicates"
    # mixed: the refusal never ran; one truncated unrated task, one failure: no successes
    assert (mixed["successes"], mixed["tasks"], mixed["requests"]) == (0, 2, 2)
    assert mixed["usd_per_success"] is None and mixed["success_rate"] == 0.0
    assert mixed["unrated_share"] == 0.5 and mixed["waste_truncated"] == 0.5
    assert mixed["flags"] == "truncations unrated"


def test_rankings_never_use_tokens(path: Path) -> None:
    assert [r["tenant"] for r in board(path, "tenant", "successes")] == ["good", "burn", "mixed"]
    assert [r["tenant"] for r in board(path, "tenant", "joules")] == ["good", "burn", "mixed"]
    rate = board(path, "tenant", "success_rate")
    assert [(r["tenant"], r["success_rate"]) for r in rate] == [
        ("good", 1.0),
        ("burn", 1.0),
        ("mixed", 0.0),
    ]


def test_by_model_a_task_belongs_to_the_model_with_most_of_its_tokens(path: Path) -> None:
    rows = {r["model"]: r for r in board(path, "model")}
    assert rows["big"]["tasks"] == 2  # good's task-1 and mixed's m3
    assert (rows["big"]["successes"], rows["big"]["success_rate"]) == (1, 0.5)
    assert rows["small"]["tasks"] == 3  # good's g3, burn's loop, mixed's m1


def test_users_appear_as_aliases_or_short_salted_hashes(path: Path) -> None:
    rows = board(path, "user", aliases={"alice": "Alice (research)"})
    bob, bot = (
        "u:" + hashlib.blake2b(raw, key=salt_key(SALT), digest_size=4).hexdigest()
        for raw in (b"bob", b"bot")
    )
    assert {r["user"] for r in rows} == {"Alice (research)", bob, bot, leaderboard.NO_USER}
    assert "bob" not in json.dumps(rows) and '"bot"' not in json.dumps(rows)


def test_a_ledger_without_the_value_tables_ranks_requests_as_tasks(tmp_path: Path) -> None:
    file = tmp_path / "old.db"
    db = connect(str(file), ledger.LEDGER_SCHEMA)
    db.executemany(insert_sql(ledger.REQUESTS), [request("r1", "a"), request("r2", "a")])
    db.close()
    [row] = board(file, "tenant")
    assert (row["tasks"], row["successes"], row["unrated_share"]) == (2, 0, 1.0)


def test_the_cli_reads_config_salt_and_aliases_and_prints_each_format(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "meterproxy.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "upstreams": [{"name": "u", "url": "http://127.0.0.1:1/v1"}],
                "ledger": {"path": str(path)},
                "value": {"salt": "env:VALUE_SALT", "user_aliases": {"bot": "the burner"}},
            }
        )
    )
    since = ["--since", "2027-01-01", "--until", "2027-01-31"]
    args = ["leaderboard", "--config", str(config), "--by", "user", *since]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VALUE_SALT", SALT)
        assert cli.main([*args, "--format", "table"]) == 0
        table = capsys.readouterr().out
        assert cli.main([*args, "--format", "csv"]) == 0
        csv = capsys.readouterr().out

    def hashed(user: bytes) -> str:
        return "u:" + hashlib.blake2b(user, key=salt_key(SALT), digest_size=4).hexdigest()

    # USD per success: bob 0.02, alice 0.10, the burner 0.15; no user: no success
    order = [hashed(b"bob"), hashed(b"alice"), "the burner", leaderboard.NO_USER]
    rows = list(csv_module.DictReader(io.StringIO(csv)))
    assert [r["user"] for r in rows] == order
    assert float(rows[2]["usd_per_success"]) == pytest.approx(0.15)
    lines = table.splitlines()
    assert lines[0].split() == ["rank", "user", *leaderboard.TABLE_COLUMNS]
    assert [line.split()[:2] for line in lines[2:6]] == [
        ["1", order[0]],
        ["2", order[1]],
        ["3", "the"],
        ["4", order[3]],
    ]
    assert "dup 80.0%" in lines[4] and lines[4].endswith("duplicates")
    assert "ranked by value" in lines[-1]
    assert cli.main(["leaderboard", "--ledger", str(tmp_path / "none.db")]) == 1
    assert "no ledger" in capsys.readouterr().err
