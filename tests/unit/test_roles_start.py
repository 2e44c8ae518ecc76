"""Starting an agent or the controller: bad settings stop it with one line; logging has one handler."""

from __future__ import annotations

import json
import logging
import re

from imageunlock.agent.handlers import run as run_agent
from imageunlock.app import logs
from imageunlock.app.kopfrun import NO_NODE_NAME
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
    logs.configure("info", "text")
    assert len(root.handlers) == 1


def _line(log_format: str, node: str | None, monkeypatch, **extra) -> str:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    logs.configure("info", log_format, node)
    [handler] = root.handlers
    record = logging.getLogger("imageunlock.agent.reconciler").makeRecord(
        "imageunlock.agent.reconciler", logging.WARNING, __file__, 1, "images %s", ("missing",), None, extra=extra
    )
    assert handler.filter(record)
    return handler.format(record)


def test_text_lines_carry_an_iso_utc_time_the_full_logger_and_the_object(monkeypatch):
    """Issue 21: an on-call engineer greps a resource, a node or a reason."""
    line = _line("text", "edge-1", monkeypatch, **logs.fields("ns", "app", "ArchiveNotFound"))
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z WARNING imageunlock\.agent\.reconciler: images missing "
        r"\[ns/app node=edge-1 reason=ArchiveNotFound\]",
        line,
    ), line


def test_json_lines_carry_logger_node_namespace_name_reason(monkeypatch):
    record = json.loads(_line("json", "edge-1", monkeypatch, **logs.fields("ns", "app", "AuthenticationFailed")))
    assert record == {
        "timestamp": record["timestamp"],
        "severity": "warning",
        "logger": "imageunlock.agent.reconciler",
        "message": "images missing",
        "node": "edge-1",
        "namespace": "ns",
        "name": "app",
        "reason": "AuthenticationFailed",
    }
    assert record["timestamp"].endswith("Z")


def test_kopf_handler_successes_are_not_logged_at_the_default_level(monkeypatch):
    """76 % of an agent's lines were kopf's "Handler 'track_objects' succeeded."."""
    monkeypatch.setattr(logging.getLogger(), "handlers", list(logging.getLogger().handlers))
    monkeypatch.setattr(logging.getLogger("kopf.objects"), "level", logging.NOTSET)
    logs.configure("info", "text")
    assert not logging.getLogger("kopf.objects").isEnabledFor(logging.INFO)
    assert logging.getLogger("kopf.objects").isEnabledFor(logging.WARNING)
    logs.configure("debug", "text")
    assert logging.getLogger("kopf.objects").isEnabledFor(logging.INFO)
