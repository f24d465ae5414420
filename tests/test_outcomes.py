"""The SQLite outcome store: round trips, draining at close, spend, labels joined to tiers."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from router.outcomes import Label, OutcomeRecord, SQLiteOutcomeStore


def _quality_record(request_id: str, tier: str, *, cost: float = 0.0) -> OutcomeRecord:
    return OutcomeRecord(
        id=request_id,
        ts=time.time(),
        tenant="default",
        alias="auto",
        tier=tier,
        model=tier,
        rule="default",
        score=0.3,
        threshold=0.5,
        policy_version="p",
        model_version="m",
        status="ok",
        http_status=200,
        stream=False,
        latency_ms=5.0,
        cost_usd=cost,
        signals={"turns": 1},
    )


def test_every_submitted_record_is_written_by_close(tmp_path: Path) -> None:
    store = SQLiteOutcomeStore(tmp_path / "o.db")
    store.start()
    for i in range(2500):
        store.submit(_quality_record(f"r{i}", "local" if i % 2 else "closed", cost=0.001))
    store.close()  # no flush: close must drain
    reopened = SQLiteOutcomeStore(tmp_path / "o.db")
    reopened.start()
    assert reopened.count() == 2500
    row = reopened.get("r7")
    assert row is not None and row["signals"] == {"turns": 1} and row["stream"] is False
    assert abs(reopened.spend_today("default") - 2.5) < 1e-9  # today's spend is reloaded
    reopened.close()


def test_the_writer_inserts_a_batch_in_a_few_statements_not_one_per_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every statement step hands the GIL back and forth; one step per row made the writer fall
    # behind a busy event loop and its queue grow with every request (bench/load.py RSS).
    store = SQLiteOutcomeStore(tmp_path / "o.db", linger_s=0.0)
    inserts: list[str] = []
    connect = store._connect

    def traced() -> sqlite3.Connection:
        conn = connect()
        conn.set_trace_callback(
            lambda sql: inserts.append(sql) if sql.startswith("INSERT") else None
        )
        return conn

    monkeypatch.setattr(store, "_connect", traced)
    store.start()
    records = [_quality_record(f"r{i}", "local") for i in range(1000)]
    for record in records:
        store.submit(record)
    store.label(Label("r0", "default", "feedback", None, 1000.0, quality=0.1))
    store.label(Label("r0", "default", "feedback", None, 1001.0, quality=0.9))  # replaces
    assert store.flush()
    assert store.count() == 1000
    assert [(lb["quality"], lb["ts"]) for lb in store.labels()] == [(0.9, 1001.0)]
    row = store.get("r999")
    assert row is not None and row["ts"] == records[999].ts and row["signals"] == {"turns": 1}
    store.close()
    # A few batches (of up to 500), each in power-of-two chunks: at most 9 statements a batch.
    assert 1 <= len(inserts) <= 40


def test_quality_by_tier_joins_labels_to_served_tiers(tmp_path: Path) -> None:
    store = SQLiteOutcomeStore(tmp_path / "q.db")
    store.start()
    for i, tier in enumerate(["local", "local", "closed"]):
        store.submit(_quality_record(f"r{i}", tier))
    store.label(Label("r0", "default", "feedback", None, 1000.0, quality=0.9))
    store.label(Label("r1", "default", "shadow", 0.75, 1000.0))  # closed better: quality 0.25
    store.label(Label("r2", "default", "feedback", None, 1000.0, quality=0.5))
    store.label(Label("r2", "default", "escalation", 1.0, 1000.0))  # not a quality source
    assert store.flush()
    quality = store.quality_by_tier(0.0)
    store.close()
    assert quality == {
        "local": {"feedback": {"n": 1, "mean": 0.9}, "shadow": {"n": 1, "mean": 0.25}},
        "closed": {"feedback": {"n": 1, "mean": 0.5}},
    }
