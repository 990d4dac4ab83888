"""deploy/ (Prometheus config, alert rules and their tests, Grafana provisioning and dashboard) agrees with the
metrics the server exposes and with docker-compose.yml.

Every ``broadcast_*`` name in an alert expression or a dashboard query must be a series that
``broadcast.observability.metrics.Metrics`` exposes: a counter family ``x`` as ``x_total``, a histogram ``x`` as
``x_bucket``/``x_sum``/``x_count``, a gauge ``x`` as ``x``. Renaming a metric without updating deploy/ fails
here, and so does a metric the dashboard does not chart. promtool (Debian's ``prometheus`` package, installed
by the test command's setup step, ``broadcast-server stack tools``) checks the config and rules and runs the
rules' unit tests.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from broadcast.observability.metrics import Metrics
from devstack.tools import require

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "broadcast.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "broadcast.yml"
COMPOSE_FILE = ROOT / "docker-compose.yml"

JOB = "broadcast"
DATASOURCE_UID = "prometheus"
SEVERITIES = {"critical", "warning", "info"}
# The sample names a family of each type is exposed under (prometheus-client, no ``_created`` series).
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
# Grafana's interval variables, replaced by a fixed range before promtool parses a dashboard query.
GRAFANA_INTERVALS = re.compile(r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_METRIC = re.compile(r"(?<![\w:])broadcast_[A-Za-z0-9_:]*")
PROMTOOL_TIMEOUT = 120


# --------------------------------------------------------------------------------------------- helpers


def load_yaml(path: Path) -> Any:
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def metric_names(expr: str) -> set[str]:
    """The ``broadcast_*`` series names a PromQL expression selects (string literals, e.g. label values, dropped)."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))


def alert_rules() -> list[dict[str, Any]]:
    loaded = load_yaml(ALERTS)
    assert isinstance(loaded, dict) and isinstance(loaded.get("groups"), list), "alerts.yml has no groups"
    rules: list[dict[str, Any]] = []
    for group in loaded["groups"]:
        assert group.get("name") == JOB, f"alert group {group.get('name')!r}: expected one group named {JOB!r}"
        assert group.get("rules"), f"alert group {group['name']} has no rules"
        rules.extend(group["rules"])
    return rules


def dashboard() -> dict[str, Any]:
    assert DASHBOARD.is_file(), f"{DASHBOARD.relative_to(ROOT)} is missing"
    loaded = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def query_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel that queries, rows (and the panels collapsed inside them) included."""
    for panel in panels:
        if panel.get("type") == "row":
            yield from query_panels(panel.get("panels") or [])
        else:
            yield panel


def dashboard_exprs() -> list[str]:
    board = dashboard()
    exprs = [str(target.get("expr", "")) for panel in query_panels(board["panels"]) for target in panel["targets"]]
    for variable in board.get("templating", {}).get("list", []):
        query = variable.get("query")
        exprs.append(str(query.get("query", "") if isinstance(query, dict) else query or ""))
    return exprs


def exposed_series() -> dict[str, str]:
    """Every sample name the server's registry exposes, mapped to its family's name."""
    registry = Metrics().registry
    exposed: dict[str, str] = {}
    for family in registry.collect():
        assert family.type in SUFFIXES, f"{family.name}: no rule for metric type {family.type!r} in this test"
        for suffix in SUFFIXES[family.type]:
            exposed[family.name + suffix] = family.name
        exposed.update({sample.name: family.name for sample in family.samples})
    return exposed


def compose_services() -> dict[str, Any]:
    loaded = load_yaml(COMPOSE_FILE)
    assert isinstance(loaded, dict) and isinstance(loaded.get("services"), dict)
    services: dict[str, Any] = loaded["services"]
    return services


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """A service's bind mounts of this repository: container path -> host path."""
    mounts: dict[str, Path] = {}
    for volume in service.get("volumes") or []:
        source, _, rest = str(volume).partition(":")
        if source.startswith((".", "/")):
            mounts[rest.split(":")[0]] = (ROOT / source).resolve()
        else:
            assert source, f"volume {volume!r} has no source"
    return mounts


def container_ports(service: dict[str, Any]) -> set[int]:
    return {int(str(mapping).split("/")[0].rsplit(":", 1)[-1]) for mapping in service.get("ports") or []}


def promtool(*args: str) -> None:
    require("promtool")
    done = subprocess.run(
        ["promtool", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"promtool {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"


# ---------------------------------------------------------------------------------------- metric names


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (le) (rate(broadcast_x_bucket{route!="/broadcast_not_a_metric"}[5m])) / on() '
        "broadcast_y_total and up{job='broadcast'} + some_broadcast_z"
    )
    assert metric_names(expr) == {"broadcast_x_bucket", "broadcast_y_total"}


def test_exposed_series_follow_the_metric_types() -> None:
    exposed = exposed_series()
    assert exposed["broadcast_events_produced_total"] == "broadcast_events_produced"
    assert exposed["broadcast_delivery_latency_seconds_bucket"] == "broadcast_delivery_latency_seconds"
    assert exposed["broadcast_outbox_backlog"] == "broadcast_outbox_backlog"
    assert "broadcast_events_produced" not in exposed, "a counter is only exposed with _total"
    assert "broadcast_outbox_backlog_total" not in exposed


def test_alerts_use_only_exposed_metrics() -> None:
    exposed = exposed_series()
    unknown = {
        f"{rule['alert']}: {name}"
        for rule in alert_rules()
        for name in metric_names(str(rule.get("expr", "")))
        if name not in exposed
    }
    assert not unknown, f"alerts.yml uses series broadcast.observability.metrics does not expose: {sorted(unknown)}"


def test_dashboard_uses_only_exposed_metrics_and_charts_them_all() -> None:
    exposed = exposed_series()
    used = {name for expr in dashboard_exprs() for name in metric_names(expr)}
    assert not used - set(exposed), f"the dashboard queries unexposed series: {sorted(used - set(exposed))}"
    charted = {exposed[name] for name in used}
    missing = set(exposed.values()) - charted
    assert not missing, f"metrics no dashboard panel charts: {sorted(missing)}"


# --------------------------------------------------------------------------------------------- alerts


def test_every_alert_has_for_severity_and_annotations() -> None:
    rules = alert_rules()
    names = [rule.get("alert") for rule in rules]
    assert all(names), "alerts.yml holds a rule that is not an alert"
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"
    for rule in rules:
        name = rule["alert"]
        assert str(rule.get("expr", "")).strip(), f"{name} has no expr"
        assert re.fullmatch(r"(\d+[smhd])+", str(rule.get("for", ""))), f"{name} needs a `for:` duration"
        assert (rule.get("labels") or {}).get("severity") in SEVERITIES, f"{name}: severity not in {SEVERITIES}"
        annotations = rule.get("annotations") or {}
        for key in ("summary", "description"):
            assert str(annotations.get(key, "")).strip(), f"{name} has no {key} annotation"


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    loaded = load_yaml(ALERT_TESTS)
    assert isinstance(loaded, dict)
    assert [(ALERT_TESTS.parent / name).resolve() for name in loaded["rule_files"]] == [ALERTS.resolve()]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in loaded["tests"]:
        for check in case.get("alert_rule_test") or []:
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {str(rule["alert"]) for rule in alert_rules()}
    assert names <= firing, f"alerts never tested firing: {sorted(names - firing)}"
    assert names <= silent, f"alerts never tested silent: {sorted(names - silent)}"
    assert firing | silent <= names, f"tests of unknown alerts: {sorted((firing | silent) - names)}"


# ------------------------------------------------------------------------------------------ dashboard


def test_dashboard_panels_have_titles_and_queries() -> None:
    board = dashboard()
    assert board.get("uid") and board.get("title"), "the dashboard needs a uid and a title"
    assert isinstance(board.get("schemaVersion"), int)
    text = DASHBOARD.read_text(encoding="utf-8")
    assert "${DS_" not in text, "an exported dashboard's ${DS_...} input does not resolve under provisioning"
    panels = list(query_panels(board["panels"]))
    assert panels, "the dashboard has no panels"
    rows = [panel for panel in board["panels"] if panel.get("type") == "row"]
    ids = [panel.get("id") for panel in [*rows, *panels]]
    assert len(set(ids)) == len(ids), "panel ids must be unique"
    for panel in panels:
        title = str(panel.get("title", "")).strip()
        assert title, f"panel {panel.get('id')} has no title"
        assert panel.get("gridPos"), f"{title}: no gridPos"
        targets = panel.get("targets") or []
        assert targets, f"{title}: no targets"
        for target in targets:
            assert str(target.get("expr", "")).strip(), f"{title}: target {target.get('refId')} has no expr"
            datasource = target.get("datasource") or panel.get("datasource") or {}
            assert datasource.get("uid") == DATASOURCE_UID, f"{title}: datasource {datasource}"


def test_grafana_provisioning_matches_the_dashboard_and_compose() -> None:
    datasources = load_yaml(DATASOURCES)["datasources"]
    (prometheus,) = (source for source in datasources if source.get("uid") == DATASOURCE_UID)
    assert prometheus["type"] == "prometheus"
    url = re.fullmatch(r"http://([\w.-]+):(\d+)/?", prometheus["url"])
    assert url, prometheus["url"]
    services = compose_services()
    assert url.group(1) in services, f"datasource host {url.group(1)} is no compose service"
    assert int(url.group(2)) in container_ports(services[url.group(1)]), "the datasource port is not Prometheus's"

    providers = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    paths = {provider["options"]["path"] for provider in providers if provider.get("type") == "file"}
    mounts = bind_mounts(services["grafana"])
    assert {mounts.get(path) for path in paths} == {DASHBOARD.parent.resolve()}, (
        f"the dashboard providers read {paths}; grafana mounts {mounts}"
    )
    assert mounts.get("/etc/grafana/provisioning") == DATASOURCES.parents[1].resolve()


# ----------------------------------------------------------------------------------- prometheus, compose


def test_prometheus_scrapes_the_app_service() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    for name in config.get("rule_files") or []:
        assert (PROMETHEUS_CONFIG.parent / name).is_file(), f"rule file {name} is missing"
    assert (PROMETHEUS_CONFIG.parent / "alerts.yml").resolve() in {
        (PROMETHEUS_CONFIG.parent / name).resolve() for name in config["rule_files"]
    }
    (job,) = (job for job in config["scrape_configs"] if job["job_name"] == JOB)
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scrape_interval", config["global"]["scrape_interval"]) == "15s"
    services = compose_services()
    app_args = [str(arg) for arg in services["app"]["command"]]
    app_port = app_args[app_args.index("--port") + 1]
    targets = [target for static in job["static_configs"] for target in static["targets"]]
    assert targets, "the broadcast job scrapes nothing"
    for target in targets:
        host, _, port = str(target).rpartition(":")
        assert host in services, f"scrape target {target}: {host} is no compose service"
        assert port == app_port, f"scrape target {target}: the app listens on {app_port}"


def test_compose_mounts_deploy() -> None:
    services = compose_services()
    for name in ("prometheus", "grafana"):
        assert name in services, f"docker-compose.yml has no {name} service"
    mounted: list[Path] = []
    for name, service in services.items():
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name} mounts {source} at {target}, which does not exist"
            if source.is_relative_to(DEPLOY.resolve()):
                mounted.append(source)
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            assert any(path.resolve().is_relative_to(source) for source in mounted), (
                f"{path.relative_to(ROOT)} is mounted by no compose service"
            )

    prometheus = services["prometheus"]
    config_flag = next(str(arg) for arg in prometheus["command"] if str(arg).startswith("--config.file="))
    config_path = config_flag.partition("=")[2]
    config_dir, _, config_name = config_path.rpartition("/")
    assert bind_mounts(prometheus).get(config_dir) == PROMETHEUS_CONFIG.parent.resolve()
    assert config_name == PROMETHEUS_CONFIG.name
    assert 9090 in container_ports(prometheus)
    assert 3000 in container_ports(services["grafana"])


# --------------------------------------------------------------------------------------------- promtool


def test_promtool_checks_config_rules_and_rule_tests() -> None:
    promtool("check", "config", str(PROMETHEUS_CONFIG.relative_to(ROOT)))
    promtool("check", "rules", str(ALERTS.relative_to(ROOT)))
    promtool("test", "rules", str(ALERT_TESTS.relative_to(ROOT)))


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    rules = [
        {"record": f"dashboard_query_{index}", "expr": GRAFANA_INTERVALS.sub("5m", expr)}
        for index, expr in enumerate(dashboard_exprs())
        if expr.strip()
    ]
    assert rules
    rule_file = tmp_path / "dashboard-queries.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    promtool("check", "rules", str(rule_file))


@pytest.mark.parametrize("expr", ["sum(rate(broadcast_x_total[$__rate_interval]))", "x[${__interval}]"])
def test_grafana_intervals_are_replaced(expr: str) -> None:
    assert "$" not in GRAFANA_INTERVALS.sub("5m", expr)
