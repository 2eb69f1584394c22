"""docker-compose.yml, checked where Docker cannot run: against the Compose Specification's schema
(a copy of the compose-spec project's, in tests/data), and against the settings the code reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("omni_engine", "producer", "worker")


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_follows_the_compose_specification():
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    jsonschema.Draft7Validator(schema).validate(_compose())


def test_every_omni_variable_it_sets_is_one_the_code_reads():
    compose = _compose()
    names = set()
    for service in compose["services"].values():
        names |= {name for name in (service.get("environment") or {}) if name.startswith("OMNI_")}
    assert names, "the compose file sets no OMNI_ variable"
    source = "\n".join(p.read_text() for package in PACKAGES for p in (ROOT / package).rglob("*.py"))
    read = set(re.findall(r'"(OMNI_[A-Z0-9_]+)"', source))
    assert names <= read, f"set in docker-compose.yml but read by no code: {sorted(names - read)}"


def test_workers_reserve_a_gpu_each_and_redis_persists():
    services = _compose()["services"]
    workers = [s for name, s in services.items() if name.startswith("worker")]
    assert workers
    for worker in workers:
        [device] = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and len(device["device_ids"]) == 1
    assert "--appendonly" in services["redis"]["command"]


# -- watching the fleet: Prometheus, Grafana, Flower (deploy/) ---------------------------------

DEPLOY = ROOT / "deploy"
WORKER_METRICS_JOB = "omni-workers"
# PromQL words that are not metric names: functions are told apart by their "(", these are not.
_PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
}


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _container_ports(service: dict) -> set[int]:
    """The ports a service listens on inside the compose network, as its file says."""
    ports = {int(p) for p in service.get("expose", [])}
    ports |= {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in service.get("ports", [])}
    if "OMNI_METRICS_PORT" in (service.get("environment") or {}):
        ports.add(int(service["environment"]["OMNI_METRICS_PORT"]))
    command = service.get("command") or []
    ports |= {int(m) for arg in command for m in re.findall(r"^--port=(\d+)$", str(arg))}
    return ports


def _scrape_targets() -> dict[str, list[str]]:
    config = _yaml(DEPLOY / "prometheus" / "prometheus.yml")
    return {
        job["job_name"]: [t for static in job["static_configs"] for t in static["targets"]]
        for job in config["scrape_configs"]
    }


def _metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    words = re.findall(r"\b[A-Za-z_:][A-Za-z0-9_:]*\b(?!\s*\()", expr)
    return {word for word in words if word not in _PROMQL_KEYWORDS}


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "omni-batch.json").read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def test_every_scrape_target_is_a_service_listening_on_that_port():
    services = _compose()["services"]
    targets = _scrape_targets()
    assert targets
    for job, hosts in targets.items():
        for target in hosts:
            host, port = target.rsplit(":", 1)
            assert host in services, f"{job}: {target} names no service of docker-compose.yml"
            assert int(port) in _container_ports(services[host]), f"{job}: {host} does not listen on {port}"


def test_prometheus_scrapes_every_worker_and_grafana_reads_that_prometheus():
    services = _compose()["services"]
    workers = {name for name in services if name.startswith("worker")}
    scraped = {target.rsplit(":", 1)[0] for target in _scrape_targets()[WORKER_METRICS_JOB]}
    assert scraped == workers
    for name in workers:
        assert services[name]["environment"].get("OMNI_METRICS_PORT"), f"{name} serves no metrics"
    mounts = " ".join(services["prometheus"]["volumes"])
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml" in mounts

    [source] = _yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    host, port = source["url"].removeprefix("http://").split(":")
    assert int(port) == 9090 and host in services and host == "prometheus"
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "omni-batch.json").read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
    [provider] = _yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "omni-batch.yml")["providers"]
    grafana_mounts = services["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in grafana_mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana_mounts


def test_every_dashboard_query_reads_only_metrics_the_worker_exports_and_shows_them_all():
    from worker.metrics import METRICS, exported_names

    exported = exported_names() | {"up"}  # `up`: Prometheus' own, per scrape target
    read: set[str] = set()
    for title, expr in _dashboard_queries():
        names = _metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        assert names <= exported, f"{title}: {sorted(names - exported)} is exported by no code"
        read |= names
    families = {family.name for metric in METRICS for family in metric.describe()}
    unshown = {f for f in families if not any(name.startswith(f) for name in read)}
    assert not unshown, f"metrics on no dashboard panel: {sorted(unshown)}"


def test_flower_reads_the_workers_broker_and_task_events_are_on_by_default():
    from producer.settings import read_environment
    from worker.app import make_app
    from worker.settings import WorkerSettings

    services = _compose()["services"]
    broker = services["worker-gpu0"]["environment"]["OMNI_BROKER_URL"]
    assert f"--broker={broker}" in services["flower"]["command"]
    assert read_environment({}).task_events
    conf = make_app(WorkerSettings(broker_url=broker)).conf
    assert conf.worker_send_task_events and conf.task_send_sent_event
