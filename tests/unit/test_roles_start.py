"""Starting an agent or the controller: bad settings stop it with one line; logging has one handler."""

from __future__ import annotations

import logging

from imageunlock.agent.handlers import run as run_agent
from imageunlock.app.kopfrun import NO_NODE_NAME, configure_logging
from imageunlock.controller.handlers import run as run_controller


def test_bad_settings_stop_the_agent_with_one_line(monkeypatch, capsys):
    for name in ("RESOURCE_API_URL", "IMAGEUNLOCK_API_URL_ALLOWLIST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("IMAGEUNLOCK_VERIFY_INTERVAL", "soon")
    assert run_agent() == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("imageunlock: error: invalid agent settings:")
    assert "IMAGEUNLOCK_VERIFY_INTERVAL='soon'" in line and "RESOURCE_API_URL" in line


def test_an_agent_without_a_node_name_stops_with_one_line(monkeypatch, capsys):
    for name in ("NODE_NAME", "IMAGEUNLOCK_NODE_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RESOURCE_API_URL", "https://api.example.com")
    assert run_agent() == 1
    assert capsys.readouterr().err.splitlines() == [f"imageunlock: error: {NO_NODE_NAME}"]


def test_bad_controller_settings_stop_it_with_one_line(monkeypatch, capsys):
    monkeypatch.setenv("IMAGEUNLOCK_AGENT_TOLERATIONS", "[{not json")
    assert run_controller() == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("imageunlock: error: invalid controller settings:") and "is not JSON" in line


def test_logging_has_one_handler_whatever_was_there(monkeypatch):
    """Issue 12, defect 1: the CLI's basicConfig handler and kopf's printed every line twice."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))  # restored afterwards
    logging.basicConfig(force=True)
    configure_logging("info", "text")
    assert len(root.handlers) == 1
    formatter = root.handlers[0].formatter
    assert formatter is not None and "%(asctime)s" in str(formatter._fmt) and "%(levelname)" in str(formatter._fmt)
