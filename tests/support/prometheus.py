"""A real Prometheus for tests: Debian's ``prometheus`` package, unpacked (never installed) by
scripts/setup.sh into ``~/.cache/imageunlock/prometheus/``, started like dockerd: its own
config and data dir, listening on 127.0.0.1 only, in its own session, stopped by PID.

Also ``promtool`` from the same package, for ``check rules`` and ``test rules``, and the
chart's alerting rules as a plain rules file (``chart_rules``).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from .net import free_port
from .processes import await_answer, log_tail, stop_group

CHART = Path(__file__).resolve().parents[2] / "chart" / "imageunlock-operator"
DASHBOARD = CHART / "dashboards" / "imageunlock.json"


class PrometheusError(RuntimeError):
    pass


def chart_rules(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The chart's PrometheusRule (metrics.prometheusRule.enabled, plus ``values`` for it) as
    a rules file: its spec.groups."""
    import helm_python  # the pinned Helm SDK, as tests/packaging renders the chart

    rule = {"enabled": True, **(values or {})}
    with helm_python.Chart.load(str(CHART)) as chart:
        rendered = chart.render({"metrics": {"prometheusRule": rule}}, name="imageunlock-operator", is_install=True)
    (text,) = [t for path, t in rendered.items() if path.endswith("/prometheusrule.yaml")]
    return {"groups": yaml.safe_load(text)["spec"]["groups"]}


def package_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "imageunlock" / "prometheus"


def binary(name: str) -> Path:
    """``prometheus`` or ``promtool`` from the unpacked package; PrometheusError if missing."""
    path = package_root() / "usr" / "bin" / name
    if not os.access(path, os.X_OK):
        raise PrometheusError(f"{path} missing: scripts/setup.sh unpacks Debian's prometheus package there")
    return path


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary("promtool")), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


class Prometheus:
    """``targets``: {job: ["127.0.0.1:PORT", ...]} scraped every second; ``rule_files``: the
    rules it evaluates every second."""

    def __init__(self, root: Path, targets: dict[str, list[str]], rule_files: Sequence[Path] = ()) -> None:
        self.root = Path(root)
        self.targets, self.rule_files = targets, list(rule_files)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.root / "prometheus.log"

    def start(self, timeout: float = 30.0) -> Prometheus:
        exe = binary("prometheus")
        self.root.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": addresses}]} for job, addresses in self.targets.items()
            ],
        }
        (self.root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        args = [
            str(exe),
            f"--config.file={self.root / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.root / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            await_answer(self.proc, self._ready, timeout, "prometheus", self.log_path, PrometheusError)
        except PrometheusError:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        """The ``data`` of a successful ``/api/v1/<path>`` answer; PrometheusError otherwise."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            answer = json.loads(exc.read() or b"{}")
        if answer.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector: [{"metric": {...}, "value": [t, "v"]}, ...]."""
        return list(self.api("query", query=expr)["result"])

    def alerts(self, name: str, state: str = "firing") -> list[dict[str, Any]]:
        """The active alerts called ``name`` in ``state`` (pending, firing)."""
        return [a for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == name and a["state"] == state]

    def up(self) -> dict[str, float]:
        """{job/instance: up} of every target."""
        return {f"{r['metric']['job']}/{r['metric']['instance']}": float(r["value"][1]) for r in self.query("up")}

    def tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    def stop(self, timeout: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        stop_group(proc, timeout=timeout)


def running(root: Path, targets: dict[str, list[str]], rule_files: Sequence[Path] = ()) -> Iterator[Prometheus]:
    """A fixture's body: a Prometheus in ``root``, stopped at the end; when it cannot start,
    the test is skipped, or fails under CI=true (tests/support/ci.py)."""
    from .ci import unavailable

    server = Prometheus(root, targets, rule_files)
    try:
        server.start()
    except PrometheusError as exc:
        unavailable("prometheus", str(exc))
    try:
        yield server
    finally:
        server.stop()


# The same as a with-statement: ``with served(root, targets, rules) as prometheus:``.
served = contextlib.contextmanager(running)
