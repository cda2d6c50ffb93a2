"""Dockerfile, docker-compose, Prometheus and Grafana files, checked with the operators' own tools.

No Docker engine runs here, so no image is built: hadolint, `docker-compose config`, promtool
(config, rules and the alert unit tests) and the metrics contract of DESIGN.md stand in. The
Kubernetes manifests are checked in test_deploy_k8s.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.support.deploy import REPO, contract, contract_problems, run, tool

DOCKERFILE = REPO / "Dockerfile"
PROMETHEUS = REPO / "deploy" / "prometheus"
GRAFANA = REPO / "deploy" / "grafana"


# ---- Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    result = run(tool("hadolint"), str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_live() -> None:
    """A linter that accepts anything would make the check above worthless."""
    bad = "FROM python:latest\nRUN apt-get update && apt-get install -y curl\nRUN cd /tmp && pip install x\n"
    result = subprocess.run([tool("hadolint"), "-"], input=bad, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the :latest tag


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())  # join continuation lines
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for op, arg in _instructions():
        if op == "FROM":
            current = arg.split()[-1]
            stages[current] = []
        if current is not None:
            stages[current].append((op, arg))
    return stages


def test_dockerfile_builds_what_the_issue_asks() -> None:
    instr = _instructions()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else None for op, a in instr if op == "ARG"}
    assert args["BASE_IMAGE"].startswith("python:3.11-slim")  # slim base, CUDA image by build arg
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert args["TORCH_VERSION"] == "2.13.0"
    assert args["FETCH_MODEL"] == "1"
    runs = " ".join(a for op, a in instr if op == "RUN")
    assert '--index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"' in runs
    assert "shardserve download" in runs

    stages = _stages()
    assert len(stages) >= 3, "multi-stage: build and model stages stay out of the runtime image"
    final = list(stages.values())[-1]
    assert final[0][1].split()[0] == "base", "the runtime stage starts from the bare base, not the build"
    user = [a for op, a in final if op == "USER"][-1]
    uid = next(a.split("=")[1] for op, a in final if op == "ARG" and a.startswith("UID="))
    assert user == "${UID}:${UID}" and int(uid) >= 1000
    assert ("EXPOSE", "8000") in final
    assert ("ENTRYPOINT", '["shardserve"]') in final
    assert json.loads(dict(final)["CMD"]) == ["serve", "--host", "0.0.0.0"]
    env = " ".join(a for op, a in final if op == "ENV")
    assert "SHARDSERVE_HOME=/models" in env
    assert any(op == "COPY" and "--from=model" in a and a.endswith("/models /models") for op, a in final)


def test_dockerignore_lets_in_exactly_what_copy_needs() -> None:
    rules = [ln for ln in (REPO / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert rules[0] == "*", "an allow-list: .git, .venv and local secrets never reach the context"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    sources = set()
    for op, arg in _instructions():
        if op == "COPY" and "--from" not in arg:
            sources |= {s.rstrip("/").removeprefix("./") for s in arg.split()[:-1]}
    assert sources == allowed
    assert all((REPO / s).exists() for s in sources)


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def _healthcheck_commands() -> dict[str, list[str]]:
    hc = next(a for op, a in _instructions() if op == "HEALTHCHECK")
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return {
        "Dockerfile": json.loads(hc[hc.index("CMD") + 3 :]),
        "docker-compose.yml": compose["services"]["shardserve"]["healthcheck"]["test"][1:],
    }


@pytest.mark.parametrize("where", ["Dockerfile", "docker-compose.yml"])
def test_healthcheck_follows_health(where: str, health_server: ThreadingHTTPServer) -> None:
    """Run the healthcheck's own command against a stub: healthy on 200, unhealthy on 503."""
    cmd = _healthcheck_commands()[where]
    assert cmd[0] == "python3", "slim images have no curl"
    cmd = [sys.executable, *cmd[1:]]
    env = {**os.environ, "SHARDSERVE_PORT": str(health_server.server_address[1])}
    for status, healthy in ((200, True), (503, False)):
        _Health.status = status
        assert (subprocess.run(cmd, env=env, capture_output=True, timeout=30).returncode == 0) is healthy


# ---- docker-compose --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    exe = tool("docker-compose")
    # without the caller's SHARDSERVE_* variables, so the file's own defaults are what is checked
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDSERVE_")}
    quiet = run(exe, "-f", "docker-compose.yml", "config", "-q", env=env)
    assert quiet.returncode == 0, quiet.stderr
    full = run(exe, "-f", "docker-compose.yml", "config", env=env)
    assert full.returncode == 0, full.stderr
    return yaml.safe_load(full.stdout)


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)([hms])", duration))


def test_compose_wires_shardserve_prometheus_grafana(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {"shardserve", "prometheus", "grafana"}
    server = services["shardserve"]
    assert server["build"]["context"] == str(REPO)
    assert {"published": 8000, "target": 8000} in server["ports"]
    assert server["shm_size"], "the ranks need more /dev/shm than Docker's 64 MB"
    grace = float(server["environment"]["SHARDSERVE_SHUTDOWN_GRACE"])
    assert _seconds(server["stop_grace_period"]) > grace, "SIGKILL would cut the drain short"
    assert server["healthcheck"]["test"][0] == "CMD"

    def mounts(name: str) -> dict[str, Path]:
        vols = [v.split(":") for v in services[name]["volumes"]]
        return {v[1]: Path(v[0]) for v in vols if v[0].startswith("/")}

    prom = mounts("prometheus")["/etc/prometheus"]
    assert prom == PROMETHEUS
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    graf = mounts("grafana")
    assert graf["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    assert graf["/var/lib/grafana/dashboards"] == GRAFANA / "dashboards"
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/shardserve.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"

    # Prometheus reaches shardserve by its service name on the container port
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "shardserve")
    assert job["static_configs"][0]["targets"] == ["shardserve:8000"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    datasource = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


# ---- Prometheus ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("check", "config", "prometheus.yml"),
        ("check", "rules", "alerts.yml"),
        ("test", "rules", "alerts_test.yml"),
    ],
    ids=["check-config", "check-rules", "alert-unit-tests"],
)
def test_promtool(args: tuple[str, ...]) -> None:
    result = run(tool("promtool"), *args, cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


def _alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_alerts_cover_the_failures_operators_page_on() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in _alert_rules()}
    joined = "\n".join(exprs.values())
    for needle in (
        "up{",
        "shardserve_rank_up",
        "shardserve_requests_waiting",
        "shardserve_time_to_first_token_seconds_bucket",
        'shardserve_requests_finished_total{reason="error"}',
        'shardserve_http_requests_total{status=~"5.."}',
        "shardserve_pool_restarts_total",
    ):
        assert needle in joined
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts_test.yml").read_text()))
    assert tested == set(exprs), "every alert has a unit test in alerts_test.yml"


def test_alert_metrics_are_in_the_contract() -> None:
    for rule in _alert_rules():
        assert contract_problems(rule["expr"], allow=frozenset({"up"})) == [], rule["alert"]


# ---- Grafana -------------------------------------------------------------------------------------


def _dashboard() -> dict:
    return json.loads((GRAFANA / "dashboards" / "shardserve.json").read_text())


def _dashboard_queries(dash: dict) -> list[str]:
    queries = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            queries.append(q["query"] if isinstance(q, dict) else q)
    return queries


def test_dashboard_metrics_are_in_the_contract() -> None:
    for expr in _dashboard_queries(_dashboard()):
        assert contract_problems(expr) == [], expr


def test_dashboard_shows_every_contract_metric() -> None:
    used = {
        re.sub(r"_(bucket|sum|count)$", "", m) if m.endswith(("_bucket", "_sum", "_count")) else m
        for expr in _dashboard_queries(_dashboard())
        for m in re.findall(r"shardserve_(\w+)", expr)
    }
    assert set(contract().metrics) - used == set()


def test_dashboard_uses_the_provisioned_datasource() -> None:
    dash = _dashboard()
    provisioned = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    uid = provisioned["datasources"][0]["uid"]
    ds_var = next(v for v in dash["templating"]["list"] if v["type"] == "datasource")
    assert ds_var["query"] == "prometheus" and ds_var["current"]["value"] == uid
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] in (uid, "${datasource}")


def test_contract_check_catches_typos() -> None:
    """The checker above is only worth something if it rejects near misses."""
    assert contract_problems("rate(shardserve_requests_finished_total[5m])") == []
    assert contract_problems("rate(shardserve_requests_finshed_total[5m])")  # misspelt name
    assert contract_problems('rate(shardserve_requests_finished_total{reason="eror"}[5m])')  # bad value
    assert contract_problems('rate(shardserve_requests_finished_total{code="500"}[5m])')  # unknown label
    assert contract_problems("sum by (model) (shardserve_requests_running)")  # groups by a missing label
    assert contract_problems("shardserve_rank_up_bucket")  # _bucket of a gauge
    assert contract_problems("process_cpu_seconds_total")  # not ours
