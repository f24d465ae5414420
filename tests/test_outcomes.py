"""The SQLite outcome store and the writer both stores share: round trips, draining at close,
spend, labels joined to tiers, columns added to older databases, and the writer's faults."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from router import outcomes as store_module
from router.outcomes import (
    Label,
    OutcomeRecord,
    SQLiteOutcomeStore,
    TieredLabel,
    reserve_in_thread,
)
from tests.conftest import wait_for
from tests.records import (
    answer_across_an_erasure,
    label_across_an_erasure,
    outcome,
    three_people,
    write_late,
)


def test_every_submitted_record_is_written_by_close(tmp_path: Path) -> None:
    store = SQLiteOutcomeStore(tmp_path / "o.db")
    store.start()
    for i in range(2500):
        store.submit(outcome(f"r{i}", tier="local" if i % 2 else "closed", cost_usd=0.001))
    store.close()  # no flush: close must drain
    reopened = SQLiteOutcomeStore(tmp_path / "o.db")
    reopened.start()
    assert reopened.count() == 2500
    row = reopened.get("r7")
    assert row is not None and row["signals"] == {"turns": 1} and row["stream"] is False
    assert abs(reopened.spend_today("default") - 2.5) < 1e-9  # today's spend is reloaded
    reopened.close()


def test_a_start_across_midnight_does_not_count_the_day_before_s_spend_today(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``start`` reads the day's spend, then loads it into the ledger. Read just before
    midnight and loaded just after, the day before's spend counted against the new day's
    budgets, and SQLite loads it only at start: all day long."""
    first = SQLiteOutcomeStore(tmp_path / "o.db")
    first.start()
    first.submit(outcome(tenant="acme", cost_usd=5.0))
    first.close()
    midnight = (time.time() // 86400 + 1) * 86400
    store = SQLiteOutcomeStore(tmp_path / "o.db")
    clock = iter([midnight - 0.001])  # the read, just before midnight; all after it, after
    monkeypatch.setattr(time, "time", lambda: next(clock, midnight + 0.001))
    try:
        store.start()
        assert store.spend_today("acme") == 0.0
    finally:
        monkeypatch.undo()
        store.close()


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
    records = [outcome(f"r{i}", tier="local") for i in range(1000)]
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


def test_labels_are_read_with_the_tier_that_served_their_request(tmp_path: Path) -> None:
    store = SQLiteOutcomeStore(tmp_path / "q.db")
    store.start()
    for i, tier in enumerate(["local", "local", "closed"]):
        store.submit(outcome(f"r{i}", tier=tier))
    store.label(Label("r0", "default", "feedback", None, 1000.0, quality=0.9))
    store.label(Label("r1", "default", "shadow", 0.75, 1000.0, cost_usd=0.0125))
    store.label(Label("r2", "default", "escalation", 1.0, 1001.0))
    store.label(Label("gone", "default", "feedback", None, 1000.0, quality=0.5))  # no record
    assert store.flush()
    labels = store.tiered_labels(1000.0)
    later = store.tiered_labels(1000.5)
    store.close()
    assert sorted(labels) == [
        TieredLabel("closed", "escalation", 1.0, None),
        TieredLabel("local", "feedback", None, 0.9),
        TieredLabel("local", "shadow", 0.75, None, 0.0125),
    ]
    assert later == [TieredLabel("closed", "escalation", 1.0, None)]


def _surrogate_record(request_id: str) -> OutcomeRecord:
    record = outcome(request_id, tier="local")
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
        store.submit(outcome("after", tier="local"))
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
            store.submit(outcome(name, tier="local"))
        assert store.flush(10)
        assert store.count() == 2 and store.get("poison") is None
        health = store.health()
        assert health["writer_alive"] is True and health["unwritable"] == 1
        store.submit(outcome("c", tier="local"))
        assert store.flush(10) and store.count() == 3
    finally:
        store.close()


def test_a_dead_writer_is_restarted_and_takes_back_its_batch_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SQLiteOutcomeStore(tmp_path / "o.db", linger_s=0.0)
    store.start()
    real = store._write
    deaths = {"once": 1, "always": 99}  # how often each record kills the writer

    def write(batch: list[OutcomeRecord | Label]) -> object:
        for item in batch:
            if isinstance(item, OutcomeRecord) and deaths.get(item.id):
                deaths[item.id] -= 1
                raise SystemExit(f"injected: {item.id} kills the writer")
        return real(batch)

    monkeypatch.setattr(store, "_write", write)
    try:
        store.submit(outcome("once"))
        assert wait_for(lambda: not store.health()["writer_alive"])
        assert "SystemExit" in str(store.health()["last_error"])
        assert store.check_writer() is not None  # what /readyz does: say so, then restart it
        assert store.flush(10) and store.get("once") is not None  # taken back and written
        assert store.health()["writer_alive"] is True and store.health()["dropped"] == 0
        store.submit(outcome("always"))
        assert wait_for(lambda: not store.health()["writer_alive"])
        assert store.check_writer() is not None  # taken back once: it kills the writer again
        assert wait_for(lambda: not store.health()["writer_alive"])
        assert store.check_writer() is not None
        store.submit(outcome("later"))
        assert store.flush(10)
        assert store.get("later") is not None and store.get("always") is None
        health = store.health()
        assert health["writer_alive"] is True and health["dropped"] == 1
        assert health["restarts"] == 3 and store.count() == 2
    finally:
        store.close()


def test_submit_never_waits_for_a_stuck_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the queue full, each submit used to block the event loop for 5 s before dropping.
    store = SQLiteOutcomeStore(tmp_path / "o.db", queue_size=2, linger_s=0.0)
    stuck = threading.Event()

    def stuck_write(batch: list[OutcomeRecord | Label]) -> None:
        stuck.wait(30)

    monkeypatch.setattr(store, "_write", stuck_write)
    store.start()
    submitter = threading.Thread(
        target=lambda: [store.submit(outcome(f"r{i}", tier="local")) for i in range(6)]
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


def test_a_database_from_before_fronts_gets_the_column_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.db"
    columns = [c for c in store_module.FIELDS if c != "front"]
    with sqlite3.connect(path) as old:  # the outcomes table as an earlier release made it
        old.execute(f"CREATE TABLE outcomes (id TEXT PRIMARY KEY, {', '.join(columns[1:])})")
        old.execute(
            f"INSERT INTO outcomes ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
            store_module._encode(outcome("before", ts=time.time() - 60), tuple(columns)),
        )
    old.close()
    store = SQLiteOutcomeStore(path)
    store.start()
    try:
        store.submit(outcome("after", front="responses"))
        assert store.flush(10)
        before, after = store.get("before"), store.get("after")
        assert before is not None and before["front"] == "chat"
        assert after is not None and after["front"] == "responses"
        fronts = [(r.id, r.front) for r in store.window(0.0)]
        assert fronts == [("before", "chat"), ("after", "responses")]
    finally:
        store.close()


def test_a_store_from_before_the_cascade_column_gains_it(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old_schema = store_module._SCHEMA.replace(", cascade TEXT", "")
    assert old_schema != store_module._SCHEMA
    with sqlite3.connect(path) as conn:
        conn.executescript(old_schema)
    store = SQLiteOutcomeStore(path)
    store.start()
    store.submit(outcome("r1", tier="closed", cascade={"decision": "escalated", "confidence": 0.1}))
    store.submit(outcome("r2"))
    store.close()
    reopened = SQLiteOutcomeStore(path)
    reopened.start()
    assert (reopened.get("r1") or {})["cascade"] == {"decision": "escalated", "confidence": 0.1}
    assert (reopened.get("r2") or {})["cascade"] is None
    reopened.close()


def test_two_replicas_starting_on_an_older_database_both_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Two processes upgraded together (or serve and another start) read the old columns, then
    # both added "front": the second start died with "duplicate column name: front".
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(store_module._SCHEMA.replace(", cascade TEXT", ""))
    conn.close()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the other replica, migrating first
    migrating = threading.Event()
    connect = SQLiteOutcomeStore._connect

    def traced(self: SQLiteOutcomeStore) -> sqlite3.Connection:
        conn = connect(self)
        conn.set_trace_callback(
            lambda sql: migrating.set() if sql.startswith(("ALTER", "BEGIN IMMEDIATE")) else None
        )
        return conn

    monkeypatch.setattr(SQLiteOutcomeStore, "_connect", traced)
    store = SQLiteOutcomeStore(path)
    failed: list[BaseException] = []

    def start() -> None:
        try:
            store.start()
        except BaseException as exc:
            failed.append(exc)

    caplog.set_level("INFO", logger="tiergate.outcomes")
    starter = threading.Thread(target=start)
    starter.start()
    assert migrating.wait(10)  # this one has begun migrating, and waits for the lock
    other.execute("ALTER TABLE outcomes ADD COLUMN cascade TEXT")
    other.execute("COMMIT")
    other.close()
    starter.join(30)
    assert failed == []
    try:
        store.submit(outcome("r1", cascade={"decision": "kept"}))
        assert store.flush(10)
        assert (store.get("r1") or {})["cascade"] == {"decision": "kept"}
    finally:
        store.close()
    assert "added" not in caplog.text  # the other replica added it
    older = tmp_path / "older.db"
    with sqlite3.connect(older) as conn:
        conn.executescript(store_module._SCHEMA.replace(", cascade TEXT", ""))
    conn.close()
    alone = SQLiteOutcomeStore(older)
    alone.start()
    alone.close()
    assert f"{older}: added the column cascade" in caplog.text  # a migration is logged


def test_close_waits_for_a_read_in_progress_on_another_thread(tmp_path: Path) -> None:
    # Closing the reader connection under a purge or dashboard read on a worker thread crashed
    # the process (a segfault in SQLite, seen in a full test run): close must wait for it.
    store = SQLiteOutcomeStore(tmp_path / "o.db")
    store.start()
    store.submit(outcome("r1"))
    assert store.flush(10)
    reading, release = threading.Event(), threading.Event()
    rows: list[int] = []

    def read() -> None:
        with store._reading() as reader:
            reading.set()
            release.wait(10)
            rows.append(len(reader.execute("SELECT id FROM outcomes").fetchall()))

    reader_thread = threading.Thread(target=read)
    reader_thread.start()
    assert reading.wait(10)
    closer = threading.Thread(target=store.close)
    closer.start()
    closer.join(0.5)
    assert closer.is_alive()  # still waiting for the read
    release.set()
    reader_thread.join(10)
    closer.join(10)
    assert not closer.is_alive() and rows == [1]


def test_a_second_writer_of_one_file_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Two `tiergate serve` on one SQLite file (an upgrade's old and new overlapping) each
    # counted only its own spend: a $0.0005 budget was spent to $0.00117, without a word.
    path = tmp_path / "o.db"
    first, second = SQLiteOutcomeStore(path), SQLiteOutcomeStore(path)
    first.start()
    assert "another process is writing it" not in caplog.text
    second.start()
    assert f"outcome store {path}: another process is writing it" in caplog.text
    second.close()
    first.close()
    caplog.clear()
    third = SQLiteOutcomeStore(path)  # the first has let the file go
    third.start()
    third.close()
    assert "another process" not in caplog.text


def test_records_past_retention_leave_no_copy_in_the_file(tmp_path: Path) -> None:
    # The purge deleted rows without secure_delete and left the write-ahead log: a record past
    # its retention period could still be read from the files' bytes.
    store = SQLiteOutcomeStore(tmp_path / "o.db")
    store.start()
    try:
        old = outcome(prompt="Dana White asks about her loan", ts=time.time() - 40 * 86400)
        store.submit(old)
        store.label(Label(old.id, old.tenant, "feedback", 1.0, old.ts, comment="Dana's comment"))
        store.submit(outcome(prompt="Evan Green asks about his bill"))
        assert store.flush(10)
        assert store.purge(time.time() - 30 * 86400) == 1
        files = b"".join(p.read_bytes() for p in tmp_path.iterdir())
        assert b"Dana White" not in files and b"Dana's comment" not in files
        assert b"Evan Green" in files
    finally:
        store.close()


def test_delete_erases_from_the_store_named_before_the_action(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tiergate outcomes --db FILE delete --tenant T` (or `--config FILE`), written as the
    listing command that showed the records is, erased from the default store instead: it
    printed "deleted 0 records ... from" the default file and the tenant's records stayed."""
    from router.cli import main

    monkeypatch.delenv("TIERGATE_SQLITE_PATH", raising=False)
    monkeypatch.setenv("TIERGATE_HOME", str(tmp_path))  # the default store: tiergate.db
    for name in ("tiergate.db", "kept.db", "named.db"):
        store = SQLiteOutcomeStore(tmp_path / name)
        store.start()
        store.submit(outcome(tenant="acme" if name != "tiergate.db" else "other"))
        assert store.flush()
        store.close()
    config = tmp_path / "settings.yaml"
    config.write_text(f"sqlite_path: {tmp_path / 'named.db'}\n")
    for where, db in (
        (["--db", str(tmp_path / "kept.db")], "kept.db"),
        (["--config", str(config)], "named.db"),
    ):
        assert main(["outcomes", *where, "delete", "--tenant", "acme"]) == 0
        assert f"deleted 1 records and 0 labels of tenant acme from {tmp_path / db}" in (
            capsys.readouterr().out
        )
        left = sqlite3.connect(tmp_path / db).execute("SELECT COUNT(*) FROM outcomes").fetchone()
        assert left == (0,)
    # --compact is Redis's stream rebuild: SQLite already overwrote what it deleted
    assert main(["outcomes", "--db", str(tmp_path / "kept.db"), "delete", "--compact"]) == 0
    assert "overwrites what it deletes: nothing to compact" in capsys.readouterr().out


def test_erasing_requests_or_a_tenant_leaves_no_copy_in_the_file(tmp_path: Path) -> None:
    # The right to erasure: the record, its labels (a feedback comment is the user's own words)
    # and every copy SQLite kept of them (a deleted row's bytes, the write-ahead log) go.
    store = SQLiteOutcomeStore(tmp_path / "o.db")
    store.start()
    try:
        alice, carol, bob = three_people(store)
        assert [lb["comment"] for lb in store.labels_of(alice.id)] == [
            "Alice Smith asks about her lease (comment)"
        ]

        assert store.erase([alice.id])[:5] == (1, 1, 0, 0, 0)
        assert store.get(alice.id) is None and store.labels_of(alice.id) == []
        assert store.get(carol.id) is not None and store.get(bob.id) is not None
        files = b"".join(p.read_bytes() for p in tmp_path.iterdir())
        assert b"Alice Smith" not in files and b"Carol Jones" in files

        assert store.erase(tenant="acme")[:5] == (1, 1, 0, 0, 0)
        assert store.count("acme") == 0 and store.count("globex") == 1
        assert [lb["tenant"] for lb in store.labels()] == ["globex"]
        files = b"".join(p.read_bytes() for p in tmp_path.iterdir())
        assert b"Carol Jones" not in files and b"Bob Brown" in files
        assert b"acme" not in files  # nor the tenant's name (its tombstone is a hash)
        assert store.erase(["req_unknown"])[:5] == (0, 0, 0, 0, 0)
    finally:
        store.close()


def test_an_erasure_a_reader_keeps_in_the_file_says_so_and_a_rerun_empties_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A connection reading a snapshot from before the erasure (a long export, a retrain, the
    dashboard of a replica) keeps SQLite from copying the write-ahead log into the file and
    emptying it: the erased prompt stayed in both, yet the command said it was deleted and
    exited 0. It says so and exits 1; run again once nothing reads, it empties the log."""
    from router.cli import main

    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_S", 0.2)
    db = tmp_path / "o.db"
    store = SQLiteOutcomeStore(db)
    store.start()
    try:
        alice, _, _ = three_people(store)
    finally:
        store.close()
    reader = sqlite3.connect(db)
    reader.execute("BEGIN")
    assert reader.execute("SELECT COUNT(*) FROM outcomes").fetchone() == (3,)
    try:
        assert main(["outcomes", "--db", str(db), "delete", "--request-id", alice.id]) == 1
        said = capsys.readouterr()
        assert "deleted 1 records and 1 labels" in said.out
        assert "the SQLite file may still hold them" in said.err and "still reading" in said.err
        files = b"".join(p.read_bytes() for p in tmp_path.iterdir())
        assert b"Alice Smith" in files  # what the reader's snapshot still reads
    finally:
        reader.close()
    assert main(["outcomes", "--db", str(db), "delete", "--request-id", alice.id]) == 0
    assert "deleted 0 records" in capsys.readouterr().out
    files = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert b"Alice Smith" not in files and b"Bob Brown" in files


def test_nothing_written_after_an_erasure_brings_it_back(tmp_path: Path) -> None:
    """A label (a shadow judgement, an escalation) or the record of a request in flight that
    the writer took after `tiergate outcomes delete` put the erased request back in the file."""
    store = SQLiteOutcomeStore(tmp_path / "o.db")
    store.start()
    try:
        cli = SQLiteOutcomeStore(tmp_path / "o.db")  # as `tiergate outcomes delete` opens it
        write_late(store, cli.erase)
        cli.close()
        spent = store.spend_today("acme")
    finally:
        store.close()
    files = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert b"Dana White" not in files and b"Erin Black" not in files
    assert b"acme" not in files  # the spend kept of acme's names it by a hash
    assert b"Bob Brown" in files
    again = SQLiteOutcomeStore(tmp_path / "o.db")  # a restart rebuilds the day's spend
    again.start()
    try:
        assert abs(again.spend_today("acme") - spent) < 1e-9
    finally:
        again.close()


def test_a_request_answered_across_an_erasure_is_erased_too(tmp_path: Path) -> None:
    """A stream of the tenant's that began before `tiergate outcomes delete --tenant` and
    ended after it was recorded, prompt and name, as the record is made when a request ends."""

    def files() -> str:
        return b"".join(p.read_bytes() for p in tmp_path.iterdir()).decode("latin-1")

    store = SQLiteOutcomeStore(tmp_path / "o.db")
    store.start()
    try:
        cli = SQLiteOutcomeStore(tmp_path / "o.db")  # as `tiergate outcomes delete` opens it
        answer_across_an_erasure(store, cli.erase, files)
        cli.close()
    finally:
        store.close()


def test_a_label_on_a_request_begun_before_an_erasure_is_refused(tmp_path: Path) -> None:
    """A label for a stored request of acme's that ended after acme's erasure but began before
    it was written, as the request was dated by its record's ts (when it ended)."""

    def tombstone(name: str, ts: float) -> None:
        with sqlite3.connect(tmp_path / "o.db") as conn:
            conn.execute(
                "INSERT INTO erasures (kind, name, ts) VALUES ('tenant', ?, ?)", (name, ts)
            )

    store = SQLiteOutcomeStore(tmp_path / "o.db")
    store.start()
    try:
        label_across_an_erasure(store, tombstone)
    finally:
        store.close()


def test_an_erased_spend_table_of_judging_alone_is_given_the_request_columns(
    tmp_path: Path,
) -> None:
    """A file whose erased_spend table kept judging alone (the release before) gets the
    request spend columns at start, and keeps what it held."""
    with sqlite3.connect(tmp_path / "o.db") as db:
        db.execute(
            "CREATE TABLE erased_spend (ts REAL NOT NULL, tenant TEXT NOT NULL, "
            "usd REAL NOT NULL, PRIMARY KEY (ts, tenant))"
        )
        bucket, name = store_module.erased_spend_key(time.time(), "acme")
        db.execute("INSERT INTO erased_spend VALUES (?, ?, 0.5)", (bucket, name))
    store = SQLiteOutcomeStore(tmp_path / "o.db")
    store.start()
    try:
        assert abs(store.spend_today("acme") - 0.5) < 1e-9
        paid = outcome(tenant="acme", ts=bucket, cost_usd=0.25, counterfactual_cost_usd=0.5)
        store.submit(paid)
        assert store.flush(10)
        assert store.erase([paid.id])[:2] == (1, 0)
        assert store.erased_spend_buckets(0.0, "acme") == [
            store_module.ErasedSpend(bucket, 0.5, 0.25, 0.5)
        ]
    finally:
        store.close()


def test_an_erasure_s_tombstone_lapses(tmp_path: Path) -> None:
    # Tombstones are kept ERASURE_KEPT_S, not for ever: then a purge deletes them.
    store = SQLiteOutcomeStore(tmp_path / "o.db")
    store.start()
    try:
        assert store.erase(["req_gone"])[:5] == (0, 0, 0, 0, 0)
        rows = sqlite3.connect(tmp_path / "o.db").execute("SELECT * FROM erasures").fetchall()
        assert len(rows) == 1 and "req_gone" not in str(rows)  # a hash, not the id
        with sqlite3.connect(tmp_path / "o.db") as conn:
            conn.execute("UPDATE erasures SET ts = ts - ?", (store_module.ERASURE_KEPT_S + 1,))
        store.submit(outcome("req_gone"))
        assert store.flush(10) and store.get("req_gone") is not None
        assert store.purge(time.time() - 86400) == 0
        assert sqlite3.connect(tmp_path / "o.db").execute("SELECT * FROM erasures").fetchall() == []
    finally:
        store.close()


def test_a_budget_check_after_an_erasure_hashes_the_tenant_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the day's spend held an erased request's, every budget check of every tenant
    hashed its tenant (SHA-256) to find that tenant's erased spend: twice the check's cost,
    on every request. The hash is remembered; the figure is the same."""
    tenant = f"acme-{time.time_ns()}"  # a name no earlier check has hashed
    store = SQLiteOutcomeStore(tmp_path / "o.db")
    store.start()
    gone = outcome(tenant=tenant, cost_usd=0.5)
    store.submit(gone)
    assert store.flush(10)
    assert store.erase([gone.id])[:2] == (1, 0)
    store.close()
    again = SQLiteOutcomeStore(tmp_path / "o.db")  # rebuilds the day's spend, the erased too
    again.start()
    hashed: list[str] = []
    real = store_module.erased_name

    def counted(kind: str, name: str) -> str:
        hashed.append(name)
        return real(kind, name)

    monkeypatch.setattr(store_module, "erased_name", counted)
    try:
        assert all(again.spend_today(tenant) == pytest.approx(0.5) for _ in range(100))
        assert hashed == [tenant]
    finally:
        again.close()


def test_a_hold_that_fails_while_its_request_is_cancelled_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The cancelled caller never reads the write's error: it is logged as the hold's, not
    left to asyncio's "Task exception was never retrieved" when the task is collected."""
    entered, go = threading.Event(), threading.Event()

    class LockedStore(SQLiteOutcomeStore):
        def reserve_spend(
            self, tenant: str, request_id: str, usd: float, budget: float | None
        ) -> bool:
            entered.set()
            go.wait(5)
            raise sqlite3.OperationalError("database is locked")

    store = LockedStore(tmp_path / "o.db")

    async def cancelled_meanwhile() -> list[dict[str, object]]:
        unhandled: list[dict[str, object]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: unhandled.append(ctx))
        call = asyncio.ensure_future(reserve_in_thread(store, "acme", "req-1", 0.5, 1.0))
        await asyncio.to_thread(entered.wait, 5)
        call.cancel()
        await asyncio.sleep(0.05)  # the caller waits for the write, cancelled
        go.set()
        with pytest.raises(asyncio.CancelledError):
            await call
        gc.collect()  # the write's task, unread, would be reported as it is collected
        await asyncio.sleep(0)
        return unhandled

    caplog.set_level("ERROR")
    try:
        unhandled = asyncio.run(cancelled_meanwhile())
    finally:
        store.close()
    assert unhandled == []
    held = [r for r in caplog.records if "holding the spend of request req-1" in r.message]
    assert len(held) == 1 and "database is locked" in caplog.text
