"""The running app's parts, typed: built by the lifespan, read by the endpoints.

One container on ``app.state`` instead of loose attributes, so an endpoint asks for
``services(request).gateway`` and the type checker knows what it gets.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import HTTPConnection

from router.config import Settings
from router.errors import TiergateError
from router.gateway import Gateway
from router.learning import LearningLoop
from router.limits import RateLimiter
from router.telemetry import Telemetry


@dataclass(frozen=True, slots=True)
class Services:
    """What a running Tiergate serves with."""

    settings: Settings
    gateway: Gateway
    learning: LearningLoop
    telemetry: Telemetry
    limiter: RateLimiter


def running(app: Starlette) -> Services | None:
    """``app``'s services, or None outside its lifespan."""
    found = getattr(app.state, "services", None)
    return found if isinstance(found, Services) else None


def services(where: HTTPConnection | Starlette) -> Services:
    """The services of the app serving ``where`` (a request, or the app itself)."""
    app = where.app if isinstance(where, HTTPConnection) else where
    found = running(app)
    if found is None:
        raise TiergateError("Tiergate is not running (its lifespan has not started)")
    return found
