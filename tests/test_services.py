"""The running app's services: none before its lifespan starts, then one typed container."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from router.app import create_app
from router.errors import TiergateError
from router.services import running, services
from tests.conftest import make_settings, policy_yaml
from tests.fake_provider import FakeProvider
from tests.scripted_local import ScriptedLocal


def test_services_are_there_once_the_lifespan_has_started(
    tmp_path: Path, fake: FakeProvider
) -> None:
    settings = make_settings(tmp_path, policy_yaml(fake))
    app = create_app(settings, local_backend=ScriptedLocal())
    assert running(app) is None
    with pytest.raises(TiergateError, match="not running"):
        services(app)
    with TestClient(app):
        found = services(app)
        assert found is running(app) and found.settings is settings
        assert found.gateway is not None and found.limiter is not None
