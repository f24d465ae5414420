"""The SQLite outcome store: round trips, draining at close, spend, labels joined to tiers."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from router import outcomes as store_module
from router.outcomes import Label, OutcomeRecord, SQLiteOutcomeStore
from tests.conftest import wait_for


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


def _surrogate_record(request_id: str) -> OutcomeRecord:
    record = _quality_record(request_id, "local")
    record.prompt = "Hi \ud800"
    record.tenant = "acme\udfff"
    record.signals = {"turns": 1, "note": "x\ud800y"}
    return record


def test_a_lone_surrogate_cannot_kill_the_writer(tmp_path: Path) -> None:
    # One such prompt killed the writer thread (UnicodeEncodeError); nothing was written after.
    store = SQLiteOutcomeStore(tmp_path / "o.db", linger_s=0.0)
    store.start()
    try:
        store.submit(_surrogate_record("bad"))
        store.submit(_quality_record("after", "local"))
        assert store.flush(10)
        assert store.health()["writer_alive"] is True
        assert store.count() == 2
        row = store.get("bad")
        assert row is not None
        assert row["prompt"] == "Hi \ufffd" and row["tenant"] == "acme\ufffd"
        assert row["signals"] == {"turns": 1, "note": "x\ufffdy"}
    finally:
        store.close()


def test_a_record_that_cannot_be_written_is_counted_and_the_rest_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SQLiteOutcomeStore(tmp_path / "o.db", linger_s=0.0)
    real = store_module._encode

    def encode(record: OutcomeRecord | Label, names: tuple[str, ...]) -> tuple[object, ...]:
        if getattr(record, "id", "") == "poison":
            raise ValueError("cannot encode this one")
        return real(record, names)

    monkeypatch.setattr(store_module, "_encode", encode)
    store.start()
    try:
        for name in ("a", "poison", "b"):
            store.submit(_quality_record(name, "local"))
        assert store.flush(10)
        assert store.count() == 2 and store.get("poison") is None
        health = store.health()
        assert health["writer_alive"] is True and health["unwritable"] == 1
        store.submit(_quality_record("c", "local"))
        assert store.flush(10) and store.count() == 3
    finally:
        store.close()


def test_a_dead_writer_shows_in_health_and_is_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SQLiteOutcomeStore(tmp_path / "o.db", linger_s=0.0)
    store.start()
    real = store._write
    failures = [SystemExit("injected: the writer thread dies")]

    def write(conn: sqlite3.Connection, batch: list[OutcomeRecord | Label]) -> None:
        if failures:
            raise failures.pop()
        real(conn, batch)

    monkeypatch.setattr(store, "_write", write)
    try:
        store.submit(_quality_record("killer", "local"))
        assert wait_for(lambda: not store.health()["writer_alive"])
        health = store.health()
        assert "SystemExit" in str(health["last_error"])
        store.check_writer()  # what /readyz does: say so, then restart it
        assert store.health()["writer_alive"] is True and store.health()["restarts"] == 1
        store.submit(_quality_record("later", "local"))
        assert store.flush(10)
        assert store.get("later") is not None
    finally:
        store.close()


def test_submit_never_waits_for_a_stuck_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the queue full, each submit used to block the event loop for 5 s before dropping.
    store = SQLiteOutcomeStore(tmp_path / "o.db", queue_size=2, linger_s=0.0)
    stuck = threading.Event()
    monkeypatch.setattr(store, "_write", lambda conn, batch: stuck.wait(30))
    store.start()
    submitter = threading.Thread(
        target=lambda: [store.submit(_quality_record(f"r{i}", "local")) for i in range(6)]
    )
    submitter.start()
    submitter.join(4.0)
    try:
        assert not submitter.is_alive(), "submit blocked on a full queue"
        assert store.health()["dropped"] >= 3
    finally:
        stuck.set()
        submitter.join()
        store.close()


def test_a_store_from_before_the_cascade_column_gains_it(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old_schema = store_module._SCHEMA.replace(", cascade TEXT", "")
    assert old_schema != store_module._SCHEMA
    with sqlite3.connect(path) as conn:
        conn.executescript(old_schema)
    store = SQLiteOutcomeStore(path)
    store.start()
    record = _quality_record("r1", "closed")
    record.cascade = {"decision": "escalated", "confidence": 0.1}
    store.submit(record)
    store.submit(_quality_record("r2", "local"))
    store.close()
    reopened = SQLiteOutcomeStore(path)
    reopened.start()
    assert (reopened.get("r1") or {})["cascade"] == {"decision": "escalated", "confidence": 0.1}
    assert (reopened.get("r2") or {})["cascade"] is None
    reopened.close()
