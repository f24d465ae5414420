"""The outcome store: one record per request, success or failure, written off the request path.

:class:`OutcomeRecord` is what Tiergate learns and reports from; a :class:`Label` is a quality
signal about an earlier request (user feedback, a shadow judge's verdict, an escalation). Stores
implement :class:`OutcomeStore` and share one :class:`OutcomeWriter` (buffer, thread, records in
flight, ``flush``, spend): a store adds only how a batch is written and how records are read.
:class:`SQLiteOutcomeStore` is the embedded default;
:class:`~router.outcomes_redis.RedisOutcomeStore` serves replicas that share one Redis.

``submit`` never blocks and never raises, and no record can stop the writer: strings are made
valid UTF-8 as they are written (a lone surrogate becomes U+FFFD), a record that still cannot be
written is counted (``unwritable``) and skipped, and a writer thread that dies anyway shows in
``health`` (so in ``/readyz``) and is started again. ``purge`` deletes records and labels past
the policy's retention period.

``erase`` leaves a tombstone for what it deleted (a hash of the request id or tenant, kept for
:data:`ERASURE_KEPT_S`), and every write checks it, so that nothing written after an erasure
(a label from a shadow judgement or an escalation, a record of a request in flight, an outage
journal replayed) brings an erased request back (:func:`refused`).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import sqlite3
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol

log = logging.getLogger("tiergate.outcomes")


@dataclass(slots=True)
class OutcomeRecord:
    """What happened to one request. ``signals`` never holds prompt text."""

    id: str
    ts: float
    tenant: str
    alias: str
    tier: str | None
    model: str | None
    rule: str | None
    score: float | None
    threshold: float | None
    policy_version: str | None
    model_version: str | None
    status: str  # ok | error | aborted
    http_status: int
    stream: bool
    latency_ms: float
    ttft_ms: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    counterfactual_cost_usd: float = 0.0
    error_type: str | None = None
    fallback: str | None = None
    capability: str | None = None
    stakes: str | None = None
    signals: dict[str, Any] = field(default_factory=dict)
    prompt: str | None = None
    front: str = "chat"  # the API the request came through: chat | messages | responses
    #: A cascaded request's local part: the judgement (decision, confidence, threshold, reason),
    #: the local model's tokens, time and cost, and how long a stream held back its first tokens.
    cascade: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


LABEL_SOURCES: tuple[str, ...] = ("feedback", "shadow", "escalation")


@dataclass(slots=True)
class Label:
    """A quality signal about one earlier request, from ``source`` (see :data:`LABEL_SOURCES`).

    ``value`` is the training label, in [0, 1]: how strongly the closed model's answer would have
    been materially better than the answer served (1 = closed clearly better, 0 = the local answer
    was at least as good; the routing classifier's positive class). ``quality`` is the quality of
    the answer actually served, when the source says it (feedback), else None. ``cost_usd`` is
    what producing the label cost (shadow calls to the closed model and the judge); it counts
    against the tenant's budget like any request.
    """

    request_id: str
    tenant: str
    source: str
    value: float | None
    ts: float
    quality: float | None = None
    cost_usd: float = 0.0
    comment: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


Item = OutcomeRecord | Label

FIELDS: tuple[str, ...] = tuple(f.name for f in fields(OutcomeRecord))
LABEL_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Label))
_JSON_FIELDS = {"signals", "detail", "cascade"}
_BOOL_FIELDS = {"stream"}


class WindowRow(NamedTuple):
    """One record as the dashboard counts it (see :meth:`OutcomeStore.window`)."""

    id: str
    ts: float
    tenant: str
    alias: str
    tier: str | None
    model: str | None
    rule: str | None
    status: str
    http_status: int
    error_type: str | None
    fallback: str | None
    cost_usd: float
    counterfactual_cost_usd: float
    policy_version: str | None
    model_version: str | None
    front: str
    #: A cascaded request's decision (``kept``, ``escalated``...) and a stream's hold-back.
    cascade_decision: str | None = None
    hold_back_ms: float | None = None

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> WindowRow:
        """The row of a record dict; a record from before fronts were recorded is ``chat``'s."""
        part = record.get("cascade") or {}
        values = {
            **record,
            "cascade_decision": part.get("decision"),
            "hold_back_ms": part.get("hold_back_ms"),
        }
        row = cls._make(map(values.get, cls._fields))
        return row if row.front else row._replace(front="chat")


class TieredLabel(NamedTuple):
    """A label with the tier that served the request it is about, and what producing the
    label cost (shadow judging's calls)."""

    tier: str | None
    source: str
    value: float | None
    quality: float | None
    cost_usd: float = 0.0


class Erased(NamedTuple):
    """What :meth:`OutcomeStore.erase` deleted."""

    records: int
    labels: int
    #: Items dropped from a Redis store's outage journal; None where a running Tiergate holds
    #: the journal (and so would replay them), 0 where there is none (SQLite).
    journal: int | None = 0
    #: Lines dropped from the journal's unreadable lines (``NAME.unreadable``) because they
    #: name an erased request or the tenant, and the lines left there that name neither.
    unreadable: int = 0
    unreadable_kept: int = 0
    #: Redis only: what became of the append-only file, which holds the erased data's commands
    #: until it is rewritten (``RedisOutcomeStore.rewrite_aof``). None where there is none.
    aof: str | None = None
    #: Redis only: why the ``outcomes`` stream may still hold erased entries' bytes (it is
    #: rebuilt without them, ``RedisOutcomeStore._rebuild_stream``); None where it holds none.
    stream: str | None = None
    #: SQLite only: why its write-ahead log, and the pages it had not yet overwritten, may
    #: still hold what it erased (``SQLiteOutcomeStore._empty_wal``); None once emptied.
    wal: str | None = None


#: How long an erasure's tombstone refuses late writes (a label from a shadow judgement or an
#: escalation, a record of a request in flight, an outage journal replayed on a replica's next
#: start): longer than any of them waits, except a journal left unreplayed for a month. Bounded
#: so that the store does not keep even a hash of every erasure for ever.
ERASURE_KEPT_S = 30 * 86400


def erased_name(kind: str, name: str) -> str:
    """The name of a tombstone (``kind`` is ``request`` or ``tenant``): a hash, so that the
    tombstone does not hold the request id or tenant it was left for."""
    return hashlib.sha256(f"{kind}\0{valid_text(name)}".encode()).hexdigest()


#: How Redis's day spend names an erased tenant's field: this, then :func:`tenant_hash`. No
#: tenant may be named so (``router.auth.parse_entry``): its spend would read as another's.
ERASED_TENANT_FIELD = "erased|"


@functools.lru_cache(maxsize=4096)
def tenant_hash(tenant: str) -> str:
    """:func:`erased_name` of a tenant, remembered: a budget check finds a tenant's erased spend
    by it on every request, and hashing it each time doubled what the check cost."""
    return erased_name("tenant", tenant)


#: How long the spend of erased records is kept (:meth:`OutcomeStore.erased_spend_buckets`):
#: the dashboard's longest window (7 days) and a day.
ERASED_SPEND_KEPT_S = 8 * 86400
#: The time it is kept to: a divisor of every dashboard bucket and of a day, so that a window
#: counts the spend of an erased item exactly when it counted the item, and a budget's day
#: counts it on the day it counted the item.
ERASED_SPEND_BUCKET_S = 30

#: What an erased item cost: ``(ts, tenant, judging, requests, counterfactual)``, in USD: a
#: shadow label's judging, a record's cost and what the request would have cost all-closed.
Cost = tuple[float, str, float, float, float]


class ErasedSpend(NamedTuple):
    """What erasures kept of the spend in one :data:`ERASED_SPEND_BUCKET_S` bucket (one
    tenant's, or every tenant's): what the shadow judgements and the requests they deleted
    (or refused, as they came later) cost, and what those requests would have cost all-closed.
    It was spent all the same, so budgets and spend totals count it."""

    ts: float
    judging_usd: float = 0.0
    requests_usd: float = 0.0
    counterfactual_usd: float = 0.0


def erased_spend(costs: Iterable[Cost]) -> dict[tuple[int, str], tuple[float, float, float]]:
    """What an erasure keeps of the items it deletes (:data:`Cost` each): their judging,
    request and counterfactual cost summed per :data:`ERASED_SPEND_BUCKET_S` and tenant, the
    tenant as a hash (:func:`erased_name`). No request id, verdict or time closer than the
    bucket stays."""
    kept: dict[tuple[int, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for ts, tenant, *usd in costs:
        if any(usd):
            sums = kept[erased_spend_key(ts, tenant)]
            for i, value in enumerate(usd):
                sums[i] += float(value)
    return {key: (a, b, c) for key, (a, b, c) in kept.items()}


def erased_spend_key(ts: float, tenant: str) -> tuple[int, str]:
    """Where :func:`erased_spend` sums an item made at ``ts`` for ``tenant``."""
    return int(ts // ERASED_SPEND_BUCKET_S) * ERASED_SPEND_BUCKET_S, erased_name("tenant", tenant)


def cost_of(item: Item) -> Cost:
    """What ``item`` cost (:data:`Cost`): a record its request, a shadow label its judging."""
    if isinstance(item, OutcomeRecord):
        cf = item.counterfactual_cost_usd
        return item.ts, item.tenant, 0.0, item.cost_usd or 0.0, cf or 0.0
    judged = item.cost_usd if item.source == "shadow" else 0.0
    return item.ts, item.tenant, judged or 0.0, 0.0, 0.0


def began(ts: float, latency_ms: float) -> float:
    """When the request of a record made at ``ts`` (when the request ended) and answered in
    ``latency_ms`` began: what an erasure compares with its time (:func:`refused`), so that a
    request still being answered when the tenant is erased is erased too. A latency that is
    not a positive finite number is taken as none."""
    return ts - latency_ms / 1000.0 if 0 < latency_ms < math.inf else ts


def refused(
    item: Item,
    erased_requests: Collection[str],
    erased_tenants: Mapping[str, float],
    record_began: Mapping[str, float],
) -> bool:
    """Whether ``item`` belongs to an erasure and must not be written. ``erased_requests``:
    the tombstone names (:func:`erased_name`) of erased request ids; ``erased_tenants``: of
    erased tenants, with when each was erased; ``record_began``: when the requests the labels
    are about began (:func:`began`), for those whose records are stored. A request id is
    erased whatever comes later (ids are never reused); a tenant's requests made (begun)
    before its erasure are, those still being answered then included, and so are labels on a
    request whose record is not stored (a label cannot show when its request was made)."""
    if isinstance(item, OutcomeRecord):
        request_id, made = item.id, began(item.ts, item.latency_ms)
    else:
        request_id, made = item.request_id, record_began.get(item.request_id, -math.inf)
    if erased_name("request", request_id) in erased_requests:
        return True
    when = erased_tenants.get(erased_name("tenant", item.tenant))
    return when is not None and made <= when


class OutcomeStore(Protocol):
    """Where records go. ``submit`` is called on the request path and must never block or raise."""

    def submit(self, record: OutcomeRecord) -> None:
        """Queue one record for writing."""
        ...

    def start(self) -> None:
        """Start writing (threads, connections)."""
        ...

    def close(self, timeout_s: float = 30.0) -> None:
        """Write everything queued, then stop."""
        ...

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything submitted so far is written (or dropped); True if it was."""
        ...

    def recent(self, limit: int = 20, tenant: str | None = None) -> list[dict[str, Any]]:
        """The newest records, newest first."""
        ...

    def count(self, tenant: str | None = None) -> int:
        """How many records are stored."""
        ...

    def window(self, since_ts: float) -> list[WindowRow]:
        """The records stored since ``since_ts``, oldest first."""
        ...

    def tiered_labels(self, since_ts: float, tenant: str | None = None) -> list[TieredLabel]:
        """Labels stored since ``since_ts`` on records still stored, with the record's tier;
        only ``tenant``'s when given."""
        ...

    def erased_spend_buckets(self, since_ts: float, tenant: str | None = None) -> list[ErasedSpend]:
        """What erased records and shadow labels made since ``since_ts`` cost (only
        ``tenant``'s when given), per bucket, oldest first: spent all the same, and counted by
        the budgets, so spend totals keep it (:func:`erased_spend`; kept
        :data:`ERASED_SPEND_KEPT_S`)."""
        ...

    def erased_judging_usd(self, since_ts: float, tenant: str | None = None) -> float:
        """What the shadow judgements of erased records made since ``since_ts`` cost (only
        ``tenant``'s when given): the sum of :meth:`erased_spend_buckets`' judging."""
        ...

    def spend_today(self, tenant: str) -> float:
        """USD recorded for ``tenant`` since 00:00 UTC, including queued records and the
        holds of requests in flight."""
        ...

    def held_today(self, tenant: str) -> float:
        """The part of :meth:`spend_today` that requests in flight here hold, not yet spent."""
        ...

    def reserve_spend(self, tenant: str, request_id: str, usd: float, budget: float | None) -> bool:
        """Hold ``usd`` for a request about to be served, unless ``tenant``'s spend today (holds
        included) has reached ``budget``; one atomic step. The request's record (or
        :meth:`release_spend`) settles the hold. May do I/O: call it off the event loop."""
        ...

    def hold_refusal(self, tenant: str, budget: float) -> str:
        """Why :meth:`reserve_spend` refused a hold against ``budget`` while the spend seen
        (:meth:`spend_today`) is under it, as the end of the refusal's reason."""
        ...

    def hold_retry_s(self, tenant: str, budget: float) -> float | None:
        """How long a client refused a hold against ``budget`` should wait where no hold of a
        request in flight frees what it asks (the store is unreachable and this replica's share
        of the budget is spent), else None: the holds stand in the way and free as their
        requests end."""
        ...

    def release_spend(self, request_id: str) -> None:
        """Drop a request's hold without a record (its record could not be built)."""
        ...

    def recent_scores(self, alias: str | None = None, limit: int = 2000) -> list[float]:
        """Routing scores of recent auto-routed requests, for online threshold calibration."""
        ...

    def get(self, record_id: str) -> dict[str, Any] | None:
        """One record by request id (including one still queued), or None."""
        ...

    def label(self, label: Label) -> None:
        """Queue one label (replaces an earlier label of the same request and source)."""
        ...

    def labels(self, since: float = 0.0, limit: int | None = None) -> list[dict[str, Any]]:
        """Stored labels newer than ``since``, oldest first."""
        ...

    def labels_of(self, request_id: str) -> list[dict[str, Any]]:
        """The stored labels of one request, whatever their age."""
        ...

    def erase(self, request_ids: Collection[str] = (), tenant: str | None = None) -> Erased:
        """Delete the records and labels of ``request_ids``, or every one of ``tenant``'s
        (the right to erasure), and refuse what is written for them later (:func:`refused`,
        for :data:`ERASURE_KEPT_S`); what went."""
        ...

    def purge(self, before_ts: float) -> int:
        """Delete records older than ``before_ts`` with their labels, and labels older than it;
        how many records went."""
        ...

    def set_retention_days(self, days: int | None) -> None:
        """The policy's ``retention_days`` (None: keep), for a store that expires keys itself."""
        ...

    def check_writer(self) -> str | None:
        """Start the writer again if it died; why it had to, or None when it was running."""
        ...

    def health(self) -> dict[str, Any]:
        """The writer's state and counters, for ``/readyz``."""
        ...


async def reserve_in_thread(
    store: OutcomeStore, tenant: str, request_id: str, usd: float, budget: float | None
) -> bool:
    """``store.reserve_spend`` in a worker thread, waited for to its end even when the caller
    is cancelled meanwhile (a client that left, a shadow judgement stopped at shutdown), so
    that the hold exists before the caller settles it. Cancelled at once, the caller settled
    (recorded, released) nothing, and the thread then made the hold: one of no request, counted
    in the tenant's spend until the process ended (in Redis, renewed as in flight, or until it
    lapsed). A caller cancelled here must settle the hold all the same. A write that failed
    meanwhile is logged here, once: the cancelled caller never reads its error."""
    write = asyncio.ensure_future(
        asyncio.to_thread(store.reserve_spend, tenant, request_id, usd, budget)
    )
    try:
        return await asyncio.shield(write)
    except asyncio.CancelledError:
        await asyncio.wait([write])  # the hold exists before the caller settles it
        failed = None if write.cancelled() else write.exception()
        if failed is not None:
            log.error(
                "holding the spend of request %s failed as it was cancelled; nothing is held",
                request_id,
                exc_info=failed,
            )
        raise


def _day(ts: float) -> int:
    return int(ts // 86400)


def valid_text(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD, so it encodes as UTF-8.

    JSON lets a client send ``"\\ud800"``; Python decodes it to a string that no UTF-8 writer
    (SQLite, Redis, a log file) accepts.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)
    return text


def valid_json(value: Any) -> str:
    """``value`` as compact JSON text that encodes as UTF-8 (see :func:`valid_text`)."""
    return valid_text(json.dumps(value, separators=(",", ":"), default=str, ensure_ascii=False))


def log_unwritable(item: Item, exc: Exception) -> None:
    """Log an outcome that a store could not write and skipped."""
    name = item.id if isinstance(item, OutcomeRecord) else item.request_id
    log.error(
        "outcome %s %s cannot be written, skipped: %s",
        type(item).__name__,
        valid_text(name),
        valid_text(f"{type(exc).__name__}: {exc}"),
    )


class WriterWatch:
    """Keeps one store's writer thread alive: runs it, notes how it died, starts it again.

    The writer catches and counts every failure it knows of; this is the net under that, for the
    failure nobody foresaw, so that it shows in ``/readyz`` instead of silently ending recording.
    """

    def __init__(self, name: str, target: Callable[[], None], on_death: Callable[[], None]) -> None:
        self._name = name
        self._target = target
        self._on_death = on_death
        self._lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.restarts = 0
        self.last_error: str | None = None

    def start(self) -> None:
        """Start the writer thread."""
        self.thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._target()
        except BaseException as exc:  # the thread ends here; check() starts another
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.critical("%s died: %s", self._name, self.last_error, exc_info=True)
            self._on_death()

    @property
    def alive(self) -> bool:
        """Whether the writer thread is running (False before start and after stop)."""
        return self.thread is not None and self.thread.is_alive()

    def check(self) -> str | None:
        """Start the writer again if it died; why it had to, or None."""
        thread = self.thread
        if thread is None or thread.is_alive():
            return None
        with self._lock:
            if self.thread is not thread:  # another caller restarted it meanwhile
                return None
            self.restarts += 1
            reason = f"{self._name} died ({self.last_error}); restarted"
            log.error("%s", reason)
            self.start()
        return reason

    def stop(self, timeout_s: float) -> bool:
        """Wait for the writer to finish (the caller has told it to stop); whether it did."""
        thread, self.thread = self.thread, None
        if thread is None:
            return True
        thread.join(timeout_s)
        return not thread.is_alive()


class DaySpend(NamedTuple):
    """Spend per tenant as a store holds it for one UTC day (days since the epoch): what a
    shared store's writer reads back, so a read that crossed midnight is known by its day.
    ``erased``: the spend of erased tenants' items, per tenant hash (:func:`tenant_hash`)."""

    day: int
    usd: Mapping[str, float]
    erased: Mapping[str, float] | None = None


class SpendLedger:
    """Per-tenant spend for the current UTC day, in memory so a budget check costs no I/O: what
    the store holds, what is queued for it, and the holds of requests in flight. What the store
    holds includes the spend of erased items, kept per tenant hash (:func:`tenant_hash`: SQLite's
    erased_spend table, the ``erased|<hash>`` fields of Redis's day spend): a tenant's is found
    by its hash."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._day = _day(time.time())
        self._stored: dict[str, float] = {}
        self._shared: dict[str, float] = {}  # the store's figures as last loaded
        self._erased: dict[str, float] = {}  # the store's erased spend, per tenant hash
        self._queued: dict[tuple[int, str], float] = defaultdict(float)
        self._holds: dict[str, tuple[str, float]] = {}
        self._held: dict[str, float] = defaultdict(float)

    def _today(self) -> int:
        today = _day(time.time())
        if today != self._day:
            self._day, self._stored, self._shared, self._erased = today, {}, {}, {}
        return today

    def load(
        self, day: int, spend: Mapping[str, float], erased: Mapping[str, float] | None = None
    ) -> None:
        """Take ``day``'s spend as the store holds it (read from the store): per tenant, and
        that of erased items per tenant hash (:func:`erased_name`), which stays unless given.
        Figures for a day that has ended are dropped: read just before midnight and taken
        just after, yesterday's spend would count against today's budgets (for SQLite, which
        loads once, all day)."""
        with self._lock:
            if day != self._today():
                return
            self._stored = dict(spend)
            self._shared = dict(spend)
            if erased is not None:
                self._erased = dict(erased)

    def shared(self, tenant: str) -> float:
        """``tenant``'s spend today as the store last reported it (every replica's records,
        its erased items' included), without what this process queued or settled since."""
        with self._lock:
            self._today()
            erased = self._erased.get(tenant_hash(tenant), 0.0) if self._erased else 0.0
            return self._shared.get(tenant, 0.0) + erased

    def queue(self, item: Item) -> None:
        """Count an item on its way to the store; a record settles its request's hold."""
        with self._lock:
            if isinstance(item, OutcomeRecord):
                self._release(item.id)
            if item.cost_usd:
                self._queued[(_day(item.ts), item.tenant)] += item.cost_usd

    def settle(self, items: Iterable[Item]) -> None:
        """Move items from queued to stored (written, or dropped: spent all the same)."""
        with self._lock:
            today = self._today()
            for item in items:
                if not item.cost_usd:
                    continue
                key = (_day(item.ts), item.tenant)
                self._queued[key] -= item.cost_usd
                if not abs(self._queued[key]) > 1e-12:
                    del self._queued[key]
                if key[0] == today:
                    self._stored[item.tenant] = self._stored.get(item.tenant, 0.0) + item.cost_usd

    def reserve(self, tenant: str, request_id: str, usd: float, budget: float | None) -> bool:
        """Hold ``usd`` for ``request_id`` unless ``tenant`` has reached ``budget``."""
        with self._lock:
            if budget is not None and self._get(tenant) >= budget:
                return False
            self._hold(tenant, request_id, usd)
            return True

    def hold(self, tenant: str, request_id: str, usd: float) -> None:
        """Hold ``usd`` for ``request_id`` (a store that checked the budget itself)."""
        with self._lock:
            self._hold(tenant, request_id, usd)

    def _hold(self, tenant: str, request_id: str, usd: float) -> None:
        self._release(request_id)
        self._holds[request_id] = (tenant, usd)
        self._held[tenant] += usd

    def release(self, request_id: str) -> str | None:
        """Drop ``request_id``'s hold, if it has one; the tenant it was held for."""
        with self._lock:
            return self._release(request_id)

    def _release(self, request_id: str) -> str | None:
        hold = self._holds.pop(request_id, None)
        if hold is None:
            return None
        tenant, usd = hold
        self._held[tenant] -= usd
        if not self._held[tenant] > 1e-12:
            del self._held[tenant]
        return tenant

    def holding(self) -> dict[str, list[str]]:
        """The request ids that hold spend here, per tenant: requests in flight (a shared
        store renews their holds, :meth:`RedisOutcomeStore._refresh`)."""
        with self._lock:
            held: dict[str, list[str]] = defaultdict(list)
            for request_id, (tenant, _) in self._holds.items():
                held[tenant].append(request_id)
            return dict(held)

    def held(self, tenant: str) -> float:
        """USD held here for ``tenant``'s requests in flight."""
        with self._lock:
            return self._held.get(tenant, 0.0)

    def get(self, tenant: str) -> float:
        """USD spent today by ``tenant``: stored, queued and held."""
        with self._lock:
            return self._get(tenant)

    def _get(self, tenant: str) -> float:
        today = self._today()
        queued = max(self._queued.get((today, tenant), 0.0), 0.0)
        erased = self._erased.get(tenant_hash(tenant), 0.0) if self._erased else 0.0
        return self._stored.get(tenant, 0.0) + erased + queued + self._held.get(tenant, 0.0)


class OutcomeWriter:
    """The writer both stores share: a bounded buffer that ``submit`` never waits on, one thread
    that writes it in batches, the records not yet written (``get`` sees them), ``flush``, and
    today's spend per tenant (:class:`SpendLedger`).

    A store implements :meth:`write_batch` and its reads. A batch stays in the buffer until it is
    written: an error in :attr:`transient` (the store is unavailable) retries it with backoff, at
    most :attr:`max_attempts` times; any other error has the batch written item by item, and an
    item that fails alone is counted (``unwritable``), logged and skipped. A writer thread that
    dies gets its batch back once when it is restarted; dying on it again drops it, so no batch
    can keep the writer dead.
    """

    #: Errors that mean the store is unavailable rather than the batch unwritable.
    transient: tuple[type[BaseException], ...] = (OSError,)
    #: Attempts at a batch before it is dropped (counted, logged); None: retry until stopped.
    max_attempts: int | None = None
    #: Without room in the buffer or elsewhere (:meth:`_keep_elsewhere`), the buffer may grow to
    #: this many times ``buffer_size`` before outcomes are dropped.
    memory_factor = 1
    #: Stopping with the store unavailable: keep what is left elsewhere (a journal) at the first
    #: failed attempt rather than retrying until the drain time is up, which may come after
    #: the process manager's SIGKILL. Without anywhere else to keep it, the writer retries.
    keep_elsewhere_at_stop = False
    #: What else an outage changes, for its log line (after "buffering outcomes").
    outage_note = ""

    def __init__(self, name: str, *, buffer_size: int, batch: int, linger_s: float) -> None:
        self.buffer_size = buffer_size
        self._batch = batch
        self._linger_s = linger_s
        self._buffer: deque[Item] = deque()
        self._inflight: dict[str, OutcomeRecord] = {}
        self._pending = 0  # submitted and not yet written or dropped
        self._cond = threading.Condition()
        self._stop = False
        self._deadline = 0.0
        self._holding: list[Item] = []  # the batch being written, taken back after a death
        self._retaken: Item | None = None  # the first item of a batch taken back
        self._writer = WriterWatch(name, self._run, self._lost_batch)
        self.ledger = SpendLedger()
        self.connected = True
        self.written = 0
        self.write_errors = 0
        self.dropped = 0  # outcomes lost: buffer full and nowhere else to keep them, or given up
        self.unwritable = 0  # records and labels that could not be written at all (logged)
        self.spilled = 0  # items kept elsewhere (:meth:`_keep_elsewhere`) when the buffer was full
        self.refused = 0  # items of an erased request or tenant that came after it (refused)
        # While the store is unavailable: when that began, and ``written``/``spilled`` then.
        self._outage: tuple[float, int, int] | None = None

    # -- what a store implements -----------------------------------------------------------

    def write_batch(self, batch: list[Item]) -> DaySpend | None:
        """Write ``batch`` in one round trip; today's spend per tenant as the store holds it
        after the write, for a store other writers share (None: this ledger is the only one)."""
        raise NotImplementedError

    def _keep_elsewhere(self, items: list[Item]) -> bool:
        """Keep items the buffer cannot hold (a journal); False when there is nowhere."""
        return False

    def _has_backlog(self) -> bool:
        """Whether items wait outside the buffer (a journal to replay)."""
        return False

    def _tend(self, idle: bool) -> None:
        """Work between batches (replay a journal, refresh shared spend)."""

    # -- submitting ------------------------------------------------------------------------

    def submit(self, record: OutcomeRecord) -> None:
        """Queue a record. Never blocks, never raises: without room anywhere it is dropped,
        counted and logged."""
        self._writer.check()
        self._enqueue(record)

    def label(self, label: Label) -> None:
        """Queue a label (written in order after its record)."""
        self._enqueue(label)

    def _enqueue(self, item: Item) -> None:
        with self._cond:
            self._adopt([item])
            # While the store is known to be down, an item goes where a crash cannot take it
            # (the journal) at once, rather than once the buffer is full.
            if self.connected and len(self._buffer) < self.buffer_size:
                self._buffer.append(item)
            elif self._keep_elsewhere([item]):
                pass
            elif len(self._buffer) < self.memory_factor * self.buffer_size:
                self._buffer.append(item)
            else:  # waiting for room would stall the event loop, so every request
                self._drop([item])
            self._cond.notify_all()

    def _adopt(self, items: list[Item]) -> None:
        """Count items as submitted and not yet written (caller holds the lock)."""
        for item in items:
            self._pending += 1
            self.ledger.queue(item)
            if isinstance(item, OutcomeRecord):
                self._inflight[item.id] = item

    def _settle(self, items: list[Item], spend: DaySpend | None = None) -> None:
        """Items written, skipped or dropped: no longer pending (caller holds the lock).
        ``spend``, read from the store after it took them, replaces the ledger's stored spend."""
        self._pending -= len(items)
        self.ledger.settle(items)
        if spend is not None:
            self.ledger.load(spend.day, spend.usd, spend.erased)
        for item in items:
            if isinstance(item, OutcomeRecord):
                self._inflight.pop(item.id, None)
        self._cond.notify_all()

    def _drop(self, items: list[Item]) -> None:
        """Give up on items (caller holds the lock): counted and logged."""
        self.dropped += len(items)
        self._settle(items)
        if self.dropped == len(items) or self.dropped % 1000 < len(items):
            log.error("outcome buffer full or store down; %d outcomes dropped so far", self.dropped)

    # -- writing ---------------------------------------------------------------------------

    def _run(self) -> None:
        backoff, attempts = 0.05, 0
        while True:
            with self._cond:
                if not self._buffer and not self._has_backlog():
                    if self._stop:
                        break
                    self._cond.wait(timeout=1.0)
                stopping = self._stop
                batch = [self._buffer[i] for i in range(min(self._batch, len(self._buffer)))]
            wrote = False
            try:
                if batch:
                    self._holding = batch
                    spend = self._write(batch)
                    self._holding = []
                    with self._cond:
                        for _ in batch:
                            self._buffer.popleft()
                        self._settle(batch, spend)
                    wrote = True
                self._tend(idle=not batch)
            except self.transient as exc:  # the store is down: retried, never a request error
                self._holding = []
                self.write_errors += 1
                attempts += 1
                self.unavailable(exc)
                if stopping and self._abandon(drop=time.monotonic() > self._deadline):
                    break
                if batch and not wrote and attempts >= (self.max_attempts or math.inf):
                    log.error("gave up writing %d outcome records and labels", len(batch))
                    with self._cond:
                        for _ in batch:
                            self._buffer.popleft()
                        self._drop(batch)
                    attempts = 0
                    continue
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            self.connected, backoff, attempts = True, 0.05, 0
            if self._outage is not None:
                self._note_recovery()
            if wrote and not stopping and self._linger_s > 0:
                # Let records gather: a writer waiting on the buffer is woken by every submit,
                # and each wake-up takes the GIL from the event loop (bench/README.md).
                time.sleep(self._linger_s)

    def unavailable(self, exc: BaseException) -> None:
        """The store did not answer (the writer, or a budget hold): the first time since it
        last answered, one warning line, not one per request or batch."""
        with self._cond:
            self.connected = False
            if self._outage is not None:
                return
            self._outage = (time.monotonic(), self.written, self.spilled)
        log.warning("outcome store unavailable, buffering outcomes%s: %s", self.outage_note, exc)

    def _note_recovery(self) -> None:
        """Once the store answers again and what waited for it is written (the buffer down to
        less than a batch, nothing left to replay), one line says what was written."""
        with self._cond:
            if self._outage is None or self._has_backlog() or len(self._buffer) >= self._batch:
                return
            began, written, spilled = self._outage
            self._outage = None
        log.warning(
            "outcome store available again after %.1f s: %d outcome items written since it "
            "went down, %d of them replayed from the journal",
            time.monotonic() - began,
            self.written - written,
            self.spilled - spilled,
        )

    def _write(self, batch: list[Item]) -> DaySpend | None:
        """Write a batch, else its items one by one, skipping (and counting) those that fail;
        what :meth:`write_batch` last said of the spend."""
        try:
            spend = self.write_batch(batch)
        except self.transient:
            raise
        except Exception:  # some item cannot be written: the others can
            spend = self._write_each(batch)
        else:
            self.written += len(batch)
        return spend

    def _write_each(self, batch: list[Item]) -> DaySpend | None:
        spend = None
        for item in batch:
            try:
                spend = self.write_batch([item])
            except self.transient:
                raise
            except Exception as exc:  # counted and logged; the writer goes on with the rest
                self.unwritable += 1
                log_unwritable(item, exc)
            else:
                self.written += 1
        return spend

    def _lost_batch(self) -> None:
        """The writer died holding a batch: it stays in the buffer for the restarted writer,
        unless it was taken back once already (then it is dropped, so it cannot kill again)."""
        batch, self._holding = self._holding, []
        if not batch:
            return
        with self._cond:
            if self._retaken is not batch[0]:
                self._retaken = batch[0]
                return
            self._retaken = None
            for _ in batch:
                self._buffer.popleft()
            self._drop(batch)

    def _abandon(self, *, drop: bool) -> bool:
        """Shutting down with the store still unavailable: keep what is left elsewhere (a
        journal) when :attr:`keep_elsewhere_at_stop` or ``drop`` says so, and with ``drop``
        drop what cannot be kept. Whether the writer may stop."""
        if not (drop or self.keep_elsewhere_at_stop):
            return False
        with self._cond:
            left = list(self._buffer)
            if not left:
                return True
            if self._keep_elsewhere(left):
                log.error("outcome store still down at shutdown; %d outcomes kept", len(left))
            elif drop:
                self._drop(left)
            else:
                return False  # nowhere to keep them: retry until the drain time is up
            self._buffer.clear()
            self._cond.notify_all()
            return True

    # -- lifecycle and state ---------------------------------------------------------------

    def _start_writer(self) -> None:
        self._stop = False
        self._writer.start()

    def _stop_writer(self, timeout_s: float) -> bool:
        """Write what is buffered (for up to ``timeout_s`` while the store is unavailable) and
        stop the writer; whether it stopped."""
        if self._writer.thread is None:
            return True
        self._writer.check()
        with self._cond:
            self._stop = True
            self._deadline = time.monotonic() + timeout_s
            self._cond.notify_all()
        return self._writer.stop(timeout_s + 10)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything submitted so far is written (or dropped); True if it was."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout=timeout_s)

    def check_writer(self) -> str | None:
        """Start the writer again if it died; why it had to, or None."""
        return self._writer.check()

    def health(self) -> dict[str, Any]:
        """Whether the writer runs, and what it has written, dropped or could not write."""
        return {
            "writer_alive": self._writer.alive,
            "restarts": self._writer.restarts,
            "last_error": self._writer.last_error,
            "written": self.written,
            "write_errors": self.write_errors,
            "unwritable": self.unwritable,
            "refused_erased": self.refused,
            "dropped": self.dropped,
            "queued": len(self._buffer),
        }

    def queued(self, record_id: str) -> dict[str, Any] | None:
        """A record submitted and not written yet, or None."""
        with self._cond:
            record = self._inflight.get(record_id)
        return None if record is None else record.as_dict()

    def spend_today(self, tenant: str) -> float:
        """USD recorded for ``tenant`` today: stored (erased items included), queued here, and
        held here."""
        return self.ledger.get(tenant)

    def held_today(self, tenant: str) -> float:
        """USD this process holds for ``tenant``'s requests in flight (in :meth:`spend_today`)."""
        return self.ledger.held(tenant)

    def erased_spend_buckets(self, since_ts: float, tenant: str | None = None) -> list[ErasedSpend]:
        """What erased items made since ``since_ts`` cost, per bucket (the store's)."""
        raise NotImplementedError

    def erased_judging_usd(self, since_ts: float, tenant: str | None = None) -> float:
        """What the shadow judgements of erased records made since ``since_ts`` cost."""
        return sum(kept.judging_usd for kept in self.erased_spend_buckets(since_ts, tenant))

    def hold_refusal(self, tenant: str, budget: float) -> str:
        """Why a hold was refused under the budget here: the holds of requests in flight
        (settled between the refusal and the spend read for its reason)."""
        return "; requests in flight hold the rest"

    def hold_retry_s(self, tenant: str, budget: float) -> float | None:
        """None: here a hold is refused only for the holds of requests in flight."""
        return None

    def reserve_spend(self, tenant: str, request_id: str, usd: float, budget: float | None) -> bool:
        """Hold ``usd`` unless ``tenant`` has reached ``budget`` (in memory, under one lock)."""
        return self.ledger.reserve(tenant, request_id, usd, budget)

    def release_spend(self, request_id: str) -> None:
        """Drop a request's hold."""
        self.ledger.release(request_id)


#: The outcomes table's columns. A column missing from an existing database is added at start,
#: so a column added later needs a definition ``ALTER TABLE ... ADD COLUMN`` accepts.
_OUTCOME_COLUMNS = {
    "id": "TEXT PRIMARY KEY", "ts": "REAL NOT NULL", "tenant": "TEXT NOT NULL",
    "alias": "TEXT NOT NULL", "tier": "TEXT", "model": "TEXT", "rule": "TEXT", "score": "REAL",
    "threshold": "REAL", "policy_version": "TEXT", "model_version": "TEXT",
    "status": "TEXT NOT NULL", "http_status": "INTEGER NOT NULL", "stream": "INTEGER NOT NULL",
    "latency_ms": "REAL NOT NULL", "ttft_ms": "REAL", "prompt_tokens": "INTEGER",
    "completion_tokens": "INTEGER", "cost_usd": "REAL", "counterfactual_cost_usd": "REAL",
    "error_type": "TEXT", "fallback": "TEXT", "capability": "TEXT", "stakes": "TEXT",
    "front": "TEXT NOT NULL DEFAULT 'chat'", "signals": "TEXT", "prompt": "TEXT",
    "cascade": "TEXT",
}  # fmt: skip

#: The tombstones erasures leave (:func:`erased_name`: ``name`` is a hash, ``kind`` request or
#: tenant, ``ts`` when), and the spend of the items they deleted or refused (:func:`erased_spend`:
#: ``ts`` the bucket, ``tenant`` a hash, ``usd`` the judging, ``requests_usd`` and
#: ``counterfactual_usd`` the requests'). The erasure makes the tables too: the CLI may erase
#: from a file that an older Tiergate made.
_ERASURES = (
    "CREATE TABLE IF NOT EXISTS erasures "
    "(name TEXT PRIMARY KEY, kind TEXT NOT NULL, ts REAL NOT NULL);"
    "CREATE TABLE IF NOT EXISTS erased_spend (ts REAL NOT NULL, tenant TEXT NOT NULL, "
    "usd REAL NOT NULL, requests_usd REAL NOT NULL DEFAULT 0, "
    "counterfactual_usd REAL NOT NULL DEFAULT 0, PRIMARY KEY (ts, tenant))"
)
#: The erased_spend columns a table made before them (judging alone) is given at start.
_ERASED_SPEND_ADDED = ("requests_usd", "counterfactual_usd")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS outcomes ({", ".join(f"{k} {v}" for k, v in _OUTCOME_COLUMNS.items())});
CREATE INDEX IF NOT EXISTS outcomes_ts ON outcomes (ts);
CREATE INDEX IF NOT EXISTS outcomes_tenant_ts ON outcomes (tenant, ts);
CREATE TABLE IF NOT EXISTS labels (
    request_id TEXT NOT NULL, tenant TEXT NOT NULL, source TEXT NOT NULL, value REAL,
    ts REAL NOT NULL, quality REAL, cost_usd REAL, comment TEXT, detail TEXT,
    PRIMARY KEY (request_id, source)
);
CREATE INDEX IF NOT EXISTS labels_ts ON labels (ts);
{_ERASURES};
"""


#: How SQLite reads each :class:`WindowRow` field: a column, or a value of the cascade's JSON.
_WINDOW_COLUMNS = {
    **{name: name for name in WindowRow._fields},
    "cascade_decision": "json_extract(cascade, '$.decision')",
    "hold_back_ms": "json_extract(cascade, '$.hold_back_ms')",
}
_WINDOW_SQL = (
    f"SELECT {', '.join(_WINDOW_COLUMNS.values())} FROM outcomes WHERE ts >= ? ORDER BY ts"
)


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Add the columns an older database lacks (the outcomes table only grows), and log them.

    The look and the additions are one write transaction: processes that start together on an
    older file take turns, and the later ones find the columns there instead of adding them
    again (which fails, "duplicate column name").
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        have = {row[1] for row in conn.execute("PRAGMA table_info(outcomes)")}
        added = [name for name in _OUTCOME_COLUMNS if name not in have]
        for name in added:
            conn.execute(f"ALTER TABLE outcomes ADD COLUMN {name} {_OUTCOME_COLUMNS[name]}")
        _migrate_erased_spend(conn)
    except BaseException:
        conn.rollback()
        raise
    conn.commit()
    if added:
        log.info(
            "outcome store %s: added the column%s %s (a database an older Tiergate wrote)",
            path,
            "s" if len(added) > 1 else "",
            ", ".join(added),
        )


def _migrate_erased_spend(conn: sqlite3.Connection) -> None:
    """Add the request spend columns to an erased_spend table that kept judging alone."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(erased_spend)")}
    for name in _ERASED_SPEND_ADDED:
        if name not in have:
            conn.execute(f"ALTER TABLE erased_spend ADD COLUMN {name} REAL NOT NULL DEFAULT 0")


def row_to_dict(row: sqlite3.Row) -> dict[str, Any]:
    """Decode one stored row back into a record dict."""
    out = dict(row)
    for key in _JSON_FIELDS:
        if out.get(key):
            out[key] = json.loads(out[key])
    for key in _BOOL_FIELDS:
        if key in out:
            out[key] = bool(out[key])
    return out


def lock_beside(path: Path, *, wait: bool = False) -> tuple[bool, IO[bytes] | None]:
    """Lock ``NAME.lock`` beside ``path`` for this process: (True, the open lock file, whose
    closing releases it), (False, None) when another process holds it (with ``wait``, wait
    for it instead), or (True, None) where no lock can be taken (not POSIX, a folder that
    cannot be written)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no check
        return True, None
    lock = path.with_name(path.name + ".lock")
    try:
        handle = lock.open("ab")
    except OSError:
        return True, None  # a read-only folder: the writes will say so
    try:
        fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return False, None
    return True, handle


def _claim_writer(path: Path) -> IO[bytes] | None:
    """Lock ``path``'s writer lock file (``NAME.lock``) and return it open, or warn and return
    None when another process holds it: each writer's ledger is then only its own spend, so
    together they can spend past a budget (a second ``tiergate serve`` on the same file, an
    old and a new one overlapping during an upgrade)."""
    free, handle = lock_beside(path)
    if not free:
        log.warning(
            "outcome store %s: another process is writing it; budgets and the spend each "
            "process counts are its own, so together they can overspend. Give each process "
            "its own TIERGATE_SQLITE_PATH, or share Redis (TIERGATE_REDIS_URL)",
            path,
        )
    return handle


#: How long a SQLite connection waits for another that holds the file (a write, or a read that
#: keeps an erasure from emptying the write-ahead log) before it gives up.
BUSY_TIMEOUT_S = 30.0


class SQLiteOutcomeStore(OutcomeWriter):
    """Records in one SQLite file (WAL mode). This writer is the file's only one, so its ledger
    is the spend: loaded at start, counted as records are submitted."""

    transient = (sqlite3.OperationalError,)  # locked, busy, disk full or read-only
    max_attempts = 5

    def __init__(
        self, path: Path, *, queue_size: int = 100_000, batch: int = 500, linger_s: float = 0.05
    ) -> None:
        super().__init__("outcome-writer", buffer_size=queue_size, batch=batch, linger_s=linger_s)
        self.path = path
        self._read_lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None
        self._conn: sqlite3.Connection | None = None  # the writer thread's
        self._claim: IO[bytes] | None = None  # the open lock file while this one writes

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def start(self) -> None:
        """Create or migrate the schema, load today's spend and start the writer thread."""
        conn = self._connect()
        self._claim = _claim_writer(self.path)
        conn.executescript(_SCHEMA)
        _migrate(conn, self.path)
        today = _day(time.time())
        start_of_day = today * 86400
        spend = conn.execute(
            "SELECT tenant, SUM(cost_usd) FROM (SELECT tenant, cost_usd FROM outcomes WHERE ts >= ?"
            " UNION ALL SELECT tenant, cost_usd FROM labels WHERE ts >= ?) GROUP BY tenant",
            (start_of_day, start_of_day),
        )
        erased = conn.execute(
            "SELECT tenant, SUM(usd + requests_usd) FROM erased_spend WHERE ts >= ? "
            "GROUP BY tenant",
            (start_of_day,),
        )
        self.ledger.load(
            today,
            {tenant: float(spent or 0.0) for tenant, spent in spend},
            {name: float(spent or 0.0) for name, spent in erased},
        )
        with conn:
            _forget_erasures(conn)
        conn.close()
        self._reader = self._connect()
        self._start_writer()

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued and stop the writer."""
        stopped = self._stop_writer(timeout_s)
        if stopped and self._conn is not None:  # else the writer is still using it
            self._conn.close()
            self._conn = None
        with self._read_lock:  # a read or purge on another thread may be using it
            if self._reader is not None:
                self._reader.close()
                self._reader = None
        if self._claim is not None:
            self._claim.close()  # releases the lock
            self._claim = None

    def health(self) -> dict[str, Any]:
        """Whether the writer runs, and what it has written, dropped or could not write."""
        return {"store": "sqlite", **super().health()}

    def write_batch(self, batch: list[Item]) -> None:
        """Insert a batch in one transaction, without the items of an erasure (:func:`refused`).
        The transaction takes the write lock before it reads the tombstones, so an erasure
        commits either before it (its tombstones are seen) or after it (it deletes the batch)."""
        if self._conn is None:
            self._conn = self._connect()
        with self._conn as conn:
            conn.execute("BEGIN IMMEDIATE")
            kept = _unrefused(conn, batch)
            if len(kept) < len(batch):
                taken = {id(item) for item in kept}
                refused = [item for item in batch if id(item) not in taken]
                _keep_spend(conn, map(cost_of, refused))
            rows = [_encode(r, FIELDS) for r in kept if isinstance(r, OutcomeRecord)]
            labels = [_encode(r, LABEL_FIELDS) for r in kept if isinstance(r, Label)]
            _insert_many(conn, "outcomes", FIELDS, rows)
            _insert_many(conn, "labels", LABEL_FIELDS, labels)
        self.refused += len(batch) - len(kept)  # once committed: a failed batch is retried

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        # The reader connection, held under the lock for the whole read: closing a connection
        # another thread is using crashes the process (SQLite's C library, not an exception).
        with self._read_lock:
            if self._reader is None:
                self._reader = self._connect()
            yield self._reader

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._reading() as reader:
            return list(reader.execute(sql, tuple(params)))

    def recent(self, limit: int = 20, tenant: str | None = None) -> list[dict[str, Any]]:
        """The newest records, newest first."""
        if tenant is None:
            rows = self._query("SELECT * FROM outcomes ORDER BY ts DESC LIMIT ?", (limit,))
        else:
            rows = self._query(
                "SELECT * FROM outcomes WHERE tenant = ? ORDER BY ts DESC LIMIT ?", (tenant, limit)
            )
        return [row_to_dict(r) for r in rows]

    def get(self, record_id: str) -> dict[str, Any] | None:
        """One record by request id, including one still waiting for the writer."""
        queued = self.queued(record_id)
        if queued is not None:
            return queued
        rows = self._query("SELECT * FROM outcomes WHERE id = ?", (record_id,))
        return row_to_dict(rows[0]) if rows else None

    def window(self, since_ts: float) -> list[WindowRow]:
        """The records stored since ``since_ts``, oldest first."""
        with self._reading() as reader:
            cursor = reader.cursor()
            cursor.row_factory = None  # plain tuples: a window may hold many rows
            rows = cursor.execute(_WINDOW_SQL, (since_ts,)).fetchall()
        return list(map(WindowRow._make, rows))

    def tiered_labels(self, since_ts: float, tenant: str | None = None) -> list[TieredLabel]:
        """Labels stored since ``since_ts`` with the tier of their record (``tenant``'s only)."""
        sql = (
            "SELECT o.tier, l.source, l.value, l.quality, COALESCE(l.cost_usd, 0.0) "
            "FROM labels l JOIN outcomes o ON o.id = l.request_id WHERE l.ts >= ?"
        )
        if tenant is None:
            rows = self._query(sql, (since_ts,))
        else:
            rows = self._query(sql + " AND l.tenant = ?", (since_ts, tenant))
        return [TieredLabel(*row) for row in rows]

    def erased_spend_buckets(self, since_ts: float, tenant: str | None = None) -> list[ErasedSpend]:
        """What erased items made since ``since_ts`` cost, per bucket (``tenant``'s only)."""
        sql = (
            "SELECT ts, SUM(usd), SUM(requests_usd), SUM(counterfactual_usd) FROM erased_spend "
            "WHERE ts >= ? {} GROUP BY ts ORDER BY ts"
        )
        if tenant is None:
            rows = self._query(sql.format(""), (since_ts,))
        else:
            name = erased_name("tenant", tenant)
            rows = self._query(sql.format("AND tenant = ?"), (since_ts, name))
        return [ErasedSpend(*map(float, row)) for row in rows]

    def labels(self, since: float = 0.0, limit: int | None = None) -> list[dict[str, Any]]:
        """Stored labels newer than ``since``, oldest first."""
        rows = self._query(
            "SELECT * FROM labels WHERE ts > ? ORDER BY ts LIMIT ?",
            (since, -1 if limit is None else limit),
        )
        return [row_to_dict(r) for r in rows]

    def set_retention_days(self, days: int | None) -> None:
        """Nothing to do: SQLite rows have no TTL, the purge loop deletes them."""

    def labels_of(self, request_id: str) -> list[dict[str, Any]]:
        """The stored labels of one request, whatever their age."""
        rows = self._query("SELECT * FROM labels WHERE request_id = ? ORDER BY ts", (request_id,))
        return [row_to_dict(r) for r in rows]

    def erase(self, request_ids: Collection[str] = (), tenant: str | None = None) -> Erased:
        """Delete the records and labels of ``request_ids``, or all of ``tenant``'s, so that no
        copy stays in the files (:meth:`_wiping`), and leave tombstones that refuse what comes
        for them later (:func:`refused`), in the same transaction."""
        records = labels = 0
        now = time.time()
        names = [("request", erased_name("request", rid), now) for rid in request_ids]
        if tenant is not None:
            names.append(("tenant", erased_name("tenant", tenant), now))
        with self._wiping() as conn:
            for table in _ERASURES.split(";"):
                conn.execute(table)
            _migrate_erased_spend(conn)
            _forget_erasures(conn)
            conn.executemany(
                "INSERT OR REPLACE INTO erasures (kind, name, ts) VALUES (?, ?, ?)", names
            )
            _keep_spend(conn, _erased_costs(conn, request_ids, tenant))
            if tenant is not None:
                records += conn.execute("DELETE FROM outcomes WHERE tenant = ?", (tenant,)).rowcount
                labels += conn.execute("DELETE FROM labels WHERE tenant = ?", (tenant,)).rowcount
            for rid in request_ids:
                records += conn.execute("DELETE FROM outcomes WHERE id = ?", (rid,)).rowcount
                labels += conn.execute("DELETE FROM labels WHERE request_id = ?", (rid,)).rowcount
        return Erased(records, labels, wal=self._empty_wal())

    @contextmanager
    def _wiping(self) -> Iterator[sqlite3.Connection]:
        """One transaction whose deletes SQLite overwrites (``secure_delete``); the caller then
        empties the write-ahead log (:meth:`_empty_wal`), which holds pages as they were."""
        with self._reading() as reader:
            reader.execute("PRAGMA secure_delete = ON")
            with reader as conn:
                yield conn

    def _empty_wal(self) -> str | None:
        """Copy the write-ahead log into the file and empty it, so that neither holds a page
        as it was before a wipe: None once done, else why not. A connection still reading a
        snapshot from before the wipe (a long export, another process) keeps SQLite from
        doing either until it ends; the checkpoint waits :data:`BUSY_TIMEOUT_S` for it."""
        with self._reading() as reader:
            busy, wal, done = reader.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if not busy:
            return None
        return (
            f"another connection to {self.path} was still reading when its write-ahead log was "
            f"to be emptied ({done} of {wal} pages copied)"
        )

    def purge(self, before_ts: float) -> int:
        """Delete records older than ``before_ts`` (the retention period) with all their
        labels, and labels older than it, leaving no copy in the files (:meth:`_wiping`)."""
        with self._wiping() as conn:
            conn.execute(
                "DELETE FROM labels WHERE ts < ? OR request_id IN "
                "(SELECT id FROM outcomes WHERE ts < ?)",
                (before_ts, before_ts),
            )
            gone = conn.execute("DELETE FROM outcomes WHERE ts < ?", (before_ts,)).rowcount
            conn.execute("DELETE FROM erased_spend WHERE ts < ?", (before_ts,))
            _forget_erasures(conn)
        left = self._empty_wal()
        if left is not None:
            log.warning("the purge's deleted rows may stay in the file until later: %s", left)
        return int(gone)

    def count(self, tenant: str | None = None) -> int:
        """How many records are stored."""
        if tenant is None:
            rows = self._query("SELECT COUNT(*) FROM outcomes")
        else:
            rows = self._query("SELECT COUNT(*) FROM outcomes WHERE tenant = ?", (tenant,))
        return int(rows[0][0])

    def recent_scores(self, alias: str | None = None, limit: int = 2000) -> list[float]:
        """Scores of recent requests that were scored, newest first."""
        if alias is None:
            rows = self._query(
                "SELECT score FROM outcomes WHERE score IS NOT NULL ORDER BY ts DESC LIMIT ?",
                (limit,),
            )
        else:
            rows = self._query(
                "SELECT score FROM outcomes WHERE score IS NOT NULL AND alias = ? "
                "ORDER BY ts DESC LIMIT ?",
                (alias, limit),
            )
        return [float(r[0]) for r in rows]


def _forget_erasures(conn: sqlite3.Connection) -> None:
    """Delete the tombstones older than :data:`ERASURE_KEPT_S`, and the judging spend older
    than :data:`ERASED_SPEND_KEPT_S`."""
    conn.execute("DELETE FROM erasures WHERE ts < ?", (time.time() - ERASURE_KEPT_S,))
    conn.execute("DELETE FROM erased_spend WHERE ts < ?", (time.time() - ERASED_SPEND_KEPT_S,))


#: What an erasure keeps of a shadow label and of a record (:data:`Cost`), by table.
_COSTS = {
    "labels": "SELECT 'l' || rowid, ts, tenant, COALESCE(cost_usd, 0), 0, 0 FROM labels "
    "WHERE source = 'shadow' AND cost_usd AND {}",
    "outcomes": "SELECT 'o' || rowid, ts, tenant, 0, COALESCE(cost_usd, 0), "
    "COALESCE(counterfactual_cost_usd, 0) FROM outcomes "
    "WHERE (cost_usd OR counterfactual_cost_usd) AND {}",
}


def _erased_costs(
    conn: sqlite3.Connection, request_ids: Collection[str], tenant: str | None
) -> list[Cost]:
    """What the records and shadow labels an erasure is about to delete cost."""
    found: dict[str, Cost] = {}
    for table, sql in _COSTS.items():
        by_request = sql.format("request_id = ?" if table == "labels" else "id = ?")
        if tenant is not None:
            found.update((r[0], r[1:]) for r in conn.execute(sql.format("tenant = ?"), (tenant,)))
        for rid in request_ids:
            found.update((r[0], r[1:]) for r in conn.execute(by_request, (rid,)))
    return list(found.values())


def _keep_spend(conn: sqlite3.Connection, costs: Iterable[Cost]) -> None:
    """Add what erased items cost to ``erased_spend`` (:func:`erased_spend`)."""
    conn.executemany(
        "INSERT INTO erased_spend (ts, tenant, usd, requests_usd, counterfactual_usd) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (ts, tenant) DO UPDATE SET "
        "usd = usd + excluded.usd, requests_usd = requests_usd + excluded.requests_usd, "
        "counterfactual_usd = counterfactual_usd + excluded.counterfactual_usd",
        [(ts, name, *usd) for (ts, name), usd in erased_spend(costs).items()],
    )


def _unrefused(conn: sqlite3.Connection, batch: list[Item]) -> list[Item]:
    """The items of ``batch`` that no tombstone refuses (:func:`refused`), read inside the
    writer's transaction."""
    names = {erased_name("tenant", item.tenant) for item in batch}
    for item in batch:
        rid = item.id if isinstance(item, OutcomeRecord) else item.request_id
        names.add(erased_name("request", rid))
    found = conn.execute(
        "SELECT kind, name, ts FROM erasures WHERE ts >= ? AND name IN "
        "(SELECT value FROM json_each(?))",
        (time.time() - ERASURE_KEPT_S, json.dumps(sorted(names))),
    ).fetchall()
    if not found:
        return batch
    requests = {name for kind, name, _ in found if kind == "request"}
    tenants = {name: float(ts) for kind, name, ts in found if kind == "tenant"}
    about = sorted({r.request_id for r in batch if isinstance(r, Label)})
    made = {
        rid: began(ts, latency_ms)
        for rid, ts, latency_ms in conn.execute(
            "SELECT id, ts, latency_ms FROM outcomes WHERE id IN (SELECT value FROM json_each(?))",
            (valid_json(about),),
        )
    }
    kept: list[Item] = []
    for item in batch:
        if refused(item, requests, tenants, made):
            continue
        kept.append(item)
        if isinstance(item, OutcomeRecord):
            made[item.id] = began(item.ts, item.latency_ms)
    return kept


def _insert_sql(table: str, names: tuple[str, ...], rows: int = 1) -> str:
    values = f"({', '.join('?' for _ in names)})"
    return (
        f"INSERT OR REPLACE INTO {table} ({', '.join(names)}) VALUES {', '.join([values] * rows)}"
    )


def _insert_many(
    conn: sqlite3.Connection, table: str, names: tuple[str, ...], rows: list[tuple[Any, ...]]
) -> None:
    """Insert ``rows`` with one multi-row statement per chunk rather than one per row.

    The sqlite3 module lets go of the GIL around every statement step and must take it back
    after; while the event loop is busy each take-back waits out the interpreter's switch
    interval, so a writer stepping once per row falls behind and its buffer grows.
    """
    # Chunk sizes are powers of two, so a few distinct statements serve every batch size: the
    # sqlite3 module caches each prepared statement by its text, and one prepared for hundreds of
    # rows holds thousands of parameter slots.
    limit = max(1, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // len(names))
    start = 0
    while start < len(rows):
        size = 1 << (min(limit, len(rows) - start).bit_length() - 1)
        chunk = rows[start : start + size]
        conn.execute(_insert_sql(table, names, size), [v for row in chunk for v in row])
        start += size


def _encode(record: Item, names: tuple[str, ...]) -> tuple[Any, ...]:
    values = []
    for name in names:
        value = getattr(record, name)
        if name in _JSON_FIELDS:
            value = valid_json(value)
        elif name in _BOOL_FIELDS:
            value = int(bool(value))
        elif isinstance(value, str):
            value = valid_text(value)
        values.append(value)
    return tuple(values)
