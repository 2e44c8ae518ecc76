"""The operator's configuration from the environment (pydantic-settings)."""

from __future__ import annotations

import pytest

from imageunlock.app.config import AgentConfig, ControllerConfig
from imageunlock.errors import ConfigurationError


def test_settings_from_env_and_errors():
    s = AgentConfig.from_env(
        {
            "IMAGEUNLOCK_ARCHIVE_ROOT": "/a:/b",
            "IMAGEUNLOCK_VERIFY_INTERVAL": "30",
            "RESOURCE_API_URL": "http://x",
            "IMAGEUNLOCK_NAMESPACES": "ns1,ns2",
        }
    )
    assert s.archive_roots == ("/a", "/b") and s.verify_interval == 30 and s.namespaces == ("ns1", "ns2")
    with pytest.raises(ConfigurationError) as info:
        AgentConfig.from_env({"IMAGEUNLOCK_ARCHIVE_ROOT": "rel", "IMAGEUNLOCK_VERIFY_INTERVAL": "soon"})
    assert "IMAGEUNLOCK_ARCHIVE_ROOT" in info.value.message and "IMAGEUNLOCK_VERIFY_INTERVAL" in info.value.message


def test_operator_settings_require_a_trusted_api():
    with pytest.raises(ConfigurationError, match="RESOURCE_API_URL or IMAGEUNLOCK_API_URL_ALLOWLIST"):
        AgentConfig.from_env({})
    assert AgentConfig.from_env({"RESOURCE_API_URL": "https://a.test"}).api_url_allowlist == ("https://a.test",)
    both = AgentConfig.from_env(
        {"RESOURCE_API_URL": "https://a.test", "IMAGEUNLOCK_API_URL_ALLOWLIST": "https://b.test, https://c.test"}
    )
    assert both.api_url_allowlist == ("https://b.test", "https://c.test", "https://a.test")


def test_image_owners_are_json_from_the_environment_and_checked():
    from imageunlock.app.config import AgentConfig
    from imageunlock.errors import ConfigurationError

    base = {"RESOURCE_API_URL": "https://api.example.test"}
    config = AgentConfig.from_env({**base, "IMAGEUNLOCK_IMAGE_OWNERS": '{"team-a": ["azaion/", "reg.corp/a/"]}'})
    assert config.image_owners == {"team-a": ("azaion/", "reg.corp/a/")}
    assert AgentConfig.from_env(base).image_owners == {}
    for bad in ('["azaion/"]', '{"team-a": "azaion/"}', "{not json"):
        with pytest.raises(ConfigurationError, match="IMAGEUNLOCK_IMAGE_OWNERS"):
            AgentConfig.from_env({**base, "IMAGEUNLOCK_IMAGE_OWNERS": bad})


def test_words_are_read_in_any_case():
    agent = AgentConfig.from_env(
        {"RESOURCE_API_URL": "https://a.test", "IMAGEUNLOCK_RUNTIME": "ContainerD", "IMAGEUNLOCK_LOG_LEVEL": "DEBUG"}
    )
    assert (agent.runtime, agent.log_level) == ("containerd", "debug")
    assert ControllerConfig.from_env({"IMAGEUNLOCK_LOG_FORMAT": "JSON"}).log_format == "json"
