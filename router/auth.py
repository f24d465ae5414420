"""Who is calling: API keys, tenants and permissions.

Every route needs a key except ``/healthz`` and ``/readyz``. A key is looked up by its sha256
hash (the plain key is never stored or logged) in three places, first hit wins:

* the YAML keys file named by ``TIERGATE_API_KEYS_FILE`` (``tiergate keys add`` prints entries),
* ``TIERGATE_ADMIN_KEYS``: comma-separated hashes of admin keys (tenant ``admin``),
* the Redis hash ``tiergate:keys`` (field = hash, value = the entry as JSON) when
  ``TIERGATE_REDIS_URL`` is set; lookups are cached in-process for :data:`CACHE_TTL_S`, and
  while Redis is unreachable it is tried again once per :data:`REDIS_RETRY_S`.

With no key source at all, Tiergate runs in *anonymous* mode: every request is the ``default``
tenant with every permission except ``admin``. That is allowed only on a loopback host, or
anywhere with ``TIERGATE_ALLOW_ANONYMOUS=true``; otherwise :func:`build_authenticator` refuses to
start. A source that is set but empty (``keys: []``, ``TIERGATE_ADMIN_KEYS=,``) is a source:
it denies everyone. ``/readyz`` is public, but a key presented there is checked, and only a
``dashboard`` or ``admin`` caller gets the report's details. :class:`AuthMiddleware` sets
``request.state.principal``, ``.tenant`` and ``.policy_headers`` / ``.policy_metadata`` for the
handlers; :func:`require` guards routes that need a permission.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.config import Settings
from router.errors import (
    AuthenticationError,
    ConfigError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    TiergateError,
    error_body,
)
from router.outcomes import ERASED_TENANT_FIELD
from router.outcomes_redis import refused_credentials

log = logging.getLogger("tiergate.auth")

Permission = Literal["pin_closed", "set_policy_headers", "dashboard", "admin"]
PERMISSIONS: tuple[str, ...] = ("pin_closed", "set_policy_headers", "dashboard", "admin")
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
REDIS_KEYS_HASH = "tiergate:keys"
CACHE_TTL_S = 10.0
REDIS_RETRY_S = 1.0  # after a failed Redis lookup, skip Redis for this long (one log per outage)
KEY_PREFIX = "tg-"


def hash_key(key: str) -> str:
    """The sha256 hex digest under which a key is stored."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random client key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. ``key_id`` is a short hash prefix, safe to log."""

    tenant: str
    permissions: frozenset[str]
    key_id: str
    policy_headers: frozenset[str] = field(default_factory=frozenset)
    policy_metadata: frozenset[str] = field(default_factory=frozenset)
    rpm: int | None = None
    tpm: int | None = None
    anonymous: bool = False

    def can(self, permission: str) -> bool:
        """Whether this caller holds ``permission`` (``admin`` holds them all)."""
        return permission in self.permissions or "admin" in self.permissions

    def allowed_policy_headers(self) -> frozenset[str] | None:
        """``x-tiergate-*`` headers the policy may read: None means all of them."""
        return None if self.can("set_policy_headers") else self.policy_headers

    def allowed_policy_metadata(self) -> frozenset[str] | None:
        """``metadata`` keys the policy may read: None means all of them (same permission)."""
        return None if self.can("set_policy_headers") else self.policy_metadata


ANONYMOUS = Principal(
    tenant="default",
    permissions=frozenset({"pin_closed", "set_policy_headers", "dashboard"}),
    key_id="anonymous",
    anonymous=True,
)


def parse_entry(data: Any, where: str) -> tuple[str, Principal]:
    """One key entry (``sha256``, ``tenant``, ``permissions``...) -> (hash, principal)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: a key entry must be a mapping")
    digest = str(data.get("sha256") or "").lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ConfigError(f"{where}: 'sha256' must be 64 hex digits (tiergate keys hash)")
    tenant = data.get("tenant")
    if not isinstance(tenant, str) or not tenant:
        raise ConfigError(f"{where}: 'tenant' is required")
    if tenant != tenant.strip() or not tenant.isprintable():
        # "acme " is not the policy's acme: its requests would get no budget and no rules.
        raise ConfigError(
            f"{where}: 'tenant' {tenant!r} begins or ends with spaces or holds control characters"
        )
    if tenant.startswith(ERASED_TENANT_FIELD):
        # Redis keeps an erased tenant's spend under this prefix and its hash: a tenant named
        # so would read, and spend against, the budget of the tenant whose hash it carries.
        raise ConfigError(
            f"{where}: 'tenant' {tenant!r} begins with {ERASED_TENANT_FIELD!r}, which names "
            "an erased tenant's spend"
        )
    perms = data.get("permissions") or []
    unknown = [p for p in perms if p not in PERMISSIONS]
    if unknown:
        raise ConfigError(f"{where}: unknown permissions {unknown}; known: {list(PERMISSIONS)}")
    headers = [str(h).lower() for h in data.get("policy_headers") or []]
    metadata = [str(k) for k in data.get("policy_metadata") or []]
    rpm, tpm = data.get("rpm"), data.get("tpm")
    return digest, Principal(
        tenant=tenant,
        permissions=frozenset(perms),
        key_id=digest[:12],
        policy_headers=frozenset(headers),
        policy_metadata=frozenset(metadata),
        rpm=int(rpm) if rpm else None,
        tpm=int(tpm) if tpm else None,
    )


def load_keys_file(path: Path) -> dict[str, Principal]:
    """Read a keys file: ``keys: [{sha256, tenant, permissions, policy_headers, rpm, tpm}]``."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read keys file {path}: {exc}") from exc
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f"keys file {path} must hold 'keys: [...]'")
    return dict(parse_entry(e, f"{path}: keys[{i}]") for i, e in enumerate(entries))


def is_loopback(host: str) -> bool:
    """Whether ``host`` binds only to this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _log_lookup_failure(exc: Exception) -> None:
    """Say why a key lookup in Redis failed, once an outage: a refused password or command
    (router.outcomes_redis) as the setting to fix. Either way known keys stay cached: the
    outcome store fails readiness for a refusal, so the replica leaves its load balancer,
    and refusing every key meanwhile would make a half-done rotation an outage for all."""
    refused = refused_credentials(exc)
    if refused is not None:
        log.error("key lookup in Redis: %s; known keys stay cached meanwhile", refused)
    else:
        log.warning("key lookup in Redis failed: %s", type(exc).__name__)


class Authenticator:
    """Maps a presented key to a :class:`Principal`, from the file, admin list or Redis."""

    def __init__(
        self,
        keys: Mapping[str, Principal],
        *,
        redis_url: str | None = None,
        anonymous: bool = False,
    ) -> None:
        self.keys = dict(keys)
        self.anonymous = anonymous
        self._redis_url = redis_url
        self._redis: Any = None
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._down_until = 0.0  # while Redis is down, lookups answer from the cache alone
        self._down_since: float | None = None

    async def authenticate(self, key: str | None) -> Principal:
        """The caller for ``key``; raises :class:`AuthenticationError` when unknown."""
        if self.anonymous:
            return ANONYMOUS
        if not key:
            raise AuthenticationError(
                "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                code="missing_api_key",
            )
        digest = hash_key(key)
        principal = self.keys.get(digest)
        if principal is None and self._redis_url:
            principal = await self._from_redis(digest)
        if principal is None:
            raise AuthenticationError("invalid API key")
        return principal

    async def _from_redis(self, digest: str) -> Principal | None:
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        if now < self._down_until:  # Redis failed a moment ago: known keys stay cached
            return cached[1] if cached is not None else None
        if self._redis is None:
            import redis.asyncio as aioredis

            self._redis = aioredis.Redis.from_url(
                str(self._redis_url), socket_timeout=0.5, socket_connect_timeout=0.5
            )
        try:
            raw = await self._redis.hget(REDIS_KEYS_HASH, digest)
        except Exception as exc:  # Redis down: known keys stay cached, unknown ones are refused
            # Retried once per REDIS_RETRY_S, not per request: each try can cost a connect
            # timeout, and the outage is logged once, not once a request.
            self._down_until = time.monotonic() + REDIS_RETRY_S
            if self._down_since is None:
                self._down_since = now
                _log_lookup_failure(exc)
            return cached[1] if cached is not None else None
        if self._down_since is not None:
            log.warning("key lookup in Redis works again after %.1f s", now - self._down_since)
            self._down_since = None
        principal = None
        if raw is not None:
            try:
                _, principal = parse_entry({"sha256": digest, **json.loads(raw)}, "redis key")
            except (ConfigError, json.JSONDecodeError, TypeError) as exc:
                log.error("bad key entry %s… in Redis: %s", digest[:12], exc)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (now + CACHE_TTL_S, principal)
        return principal

    async def aclose(self) -> None:
        """Close the Redis connection, if one was opened."""
        if self._redis is not None:
            await self._redis.aclose()


def _redis_holds_no_key(url: str) -> bool:
    """Whether Redis answers and its ``tiergate:keys`` hash is empty: with no other key source,
    every request then gets 401, which a start-up line should say. False when Redis does not
    answer (its keys are looked up per request once it does)."""
    try:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return int(client.hlen(REDIS_KEYS_HASH)) == 0
        finally:
            client.close()
    except Exception:  # not installed, unreachable: no warning, lookups say it per request
        return False


def build_authenticator(settings: Settings) -> Authenticator:
    """The authenticator for ``settings``; refuses an anonymous non-loopback deployment."""
    keys: dict[str, Principal] = {}
    if settings.api_keys_file is not None:
        keys.update(load_keys_file(settings.api_keys_file))
    for i, digest in enumerate(filter(None, (settings.admin_keys or "").split(","))):
        h, principal = parse_entry(
            {"sha256": digest.strip(), "tenant": "admin", "permissions": ["admin"]},
            f"TIERGATE_ADMIN_KEYS[{i}]",
        )
        keys[h] = principal
    # A source that is set counts even when it holds no key: removing the last key (rotation:
    # remove, then issue) must close the proxy, not open it to everyone.
    configured = (
        settings.api_keys_file is not None
        or settings.admin_keys is not None
        or settings.redis_url is not None
    )
    if configured:
        if not keys and (settings.redis_url is None or _redis_holds_no_key(settings.redis_url)):
            log.warning("the configured key sources hold no key: every request is refused")
        return Authenticator(keys, redis_url=settings.redis_url)
    if not (is_loopback(settings.host) or settings.allow_anonymous):
        raise ConfigError(
            f"no API keys are configured and host {settings.host} is not loopback: set "
            "TIERGATE_API_KEYS_FILE (see 'tiergate keys add'), or TIERGATE_ALLOW_ANONYMOUS=true "
            "to serve without keys"
        )
    log.warning(
        "no API keys configured: serving every caller as tenant 'default' (not admin); "
        "see SECURITY.md before exposing this port"
    )
    return Authenticator({}, anonymous=True)


def _presented_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
        if name == b"x-api-key":
            return value.decode("latin-1").strip()
    return None


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


# The ASGI extension that lets an application refuse a websocket handshake with an HTTP
# response of its own (uvicorn, hypercorn, Starlette's TestClient), not just a close.
_HTTP_REFUSAL = "websocket.http.response"


class AuthMiddleware:
    """Authenticates each HTTP request and caps its body size (a pure ASGI middleware).

    Auth failures are answered here (a 401 in the error shape of the path's front). An
    oversized body is raised as :class:`PayloadTooLargeError` from ``receive``, i.e. inside the
    handler reading it, so the chat handler records it like any other error.
    """

    def __init__(self, app: ASGIApp, authenticator: Authenticator, max_body_bytes: int) -> None:
        self.app = app
        self.authenticator = authenticator
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Authenticate, set ``scope['state']``, and pass on with a size-capped ``receive``."""
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        if scope["path"] in PUBLIC_PATHS:
            await self._identify(scope)
        else:
            try:
                principal = await self.authenticator.authenticate(_presented_key(scope["headers"]))
            except TiergateError as exc:
                # A log line, not an outcome record: a record per refused caller would let
                # anyone without a key fill the store. Its request id is the answer's.
                log.info(
                    "refused %s %s: %s",
                    scope.get("method", "WEBSOCKET"),
                    str(scope["path"])[:200],
                    exc.code,
                    extra={"request_id": scope.get("state", {}).get("request_id")},
                )
                if scope["type"] == "http" or _HTTP_REFUSAL in scope.get("extensions", {}):
                    await _send_error(exc, scope, send)
                else:  # a server that can only close it: uvicorn answers that with a bare 403
                    await send({"type": "websocket.close", "code": 1008})
                return
            state = scope.setdefault("state", {})
            state["principal"] = principal
            state["tenant"] = principal.tenant
            state["policy_headers"] = principal.allowed_policy_headers()
            state["policy_metadata"] = principal.allowed_policy_metadata()
        await self.app(scope, self._capped(scope, receive), send)

    async def _identify(self, scope: Scope) -> None:
        """On a public path a key is optional: a valid one is noted, a bad one is ignored."""
        try:
            principal = await self.authenticator.authenticate(_presented_key(scope["headers"]))
        except TiergateError:
            return
        scope.setdefault("state", {})["principal"] = principal

    def _capped(self, scope: Scope, receive: Receive) -> Receive:
        limit = self.max_body_bytes
        declared = _content_length(scope["headers"])
        seen = 0

        async def capped() -> Message:
            nonlocal seen
            if declared is not None and declared > limit:
                raise PayloadTooLargeError(f"request body is over the {limit}-byte limit")
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLargeError(f"request body is over the {limit}-byte limit")
            return message

        return capped


async def _send_error(exc: TiergateError, scope: Scope, send: Send) -> None:
    """Answer ``exc`` in the error shape of the path's front: an HTTP response, or for a
    websocket handshake the same response refusing it (the server's ``websocket.http.response``
    extension), so that it too is a 401 with its error, ``www-authenticate`` and request id."""
    body = json.dumps(error_body(exc, scope["path"])).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if isinstance(exc, AuthenticationError):
        headers.append((b"www-authenticate", b"Bearer"))
    kind = "http" if scope["type"] == "http" else "websocket.http"
    await send({"type": f"{kind}.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": f"{kind}.response.body", "body": body})


def principal_of(request: Request) -> Principal:
    """The caller of ``request`` (set by :class:`AuthMiddleware`)."""
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):
        raise AuthenticationError("request was not authenticated")
    return principal


def require(permission: Permission) -> Callable[[Request], Awaitable[Principal]]:
    """A FastAPI dependency: ``dependencies=[Depends(require("dashboard"))]``; 403 without it."""

    async def dependency(request: Request) -> Principal:
        principal = principal_of(request)
        if not principal.can(permission):
            raise PermissionDeniedError(f"this API key lacks the '{permission}' permission")
        return principal

    return dependency


def check_record_access(principal: Principal, record: Mapping[str, Any] | None, rid: str) -> None:
    """Raise 404 unless outcome record ``rid`` exists and belongs to the caller's tenant.

    For endpoints that read or label records (``/v1/feedback``). Another tenant's record is
    "not found", not "forbidden", so request ids cannot be probed across tenants. ``admin``
    keys may reach every tenant's records.
    """
    if record is None or not (principal.can("admin") or record.get("tenant") == principal.tenant):
        raise NotFoundError(f"no request '{rid}' for this tenant", code="request_not_found")
