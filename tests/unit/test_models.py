"""Shared data: requests name their refs, credentials never show the password."""

from __future__ import annotations

import pytest

from imageunlock.defaults import DEFAULT_IMAGES
from imageunlock.engine.models import Credentials, Phase, UnlockRequest
from imageunlock.errors import ConfigurationError


def test_a_request_names_every_image_at_its_version():
    request = UnlockRequest("/a.enc", "1.4.2", DEFAULT_IMAGES)
    assert request.refs == [f"{name}:1.4.2" for name in DEFAULT_IMAGES] and len(request.refs) == 7
    assert UnlockRequest("/a.enc", "2", ("x/y",)).refs == ["x/y:2"]


def test_credentials_hide_the_password_and_refuse_blanks():
    creds = Credentials("device@example.test", "s3cret-value")
    assert "s3cret-value" not in repr(creds) and "device@example.test" in repr(creds)
    for email, password in (("", "p"), ("e", "")):
        with pytest.raises(ConfigurationError, match="non-empty"):
            Credentials(email, password)


def test_phases_are_the_strings_status_shows():
    assert [p.value for p in Phase] == [
        "Pending",
        "Authenticating",
        "FetchingKey",
        "Loading",
        "Verifying",
        "Ready",
        "Failed",
    ]
    assert f"{Phase.READY}" == "Ready"
