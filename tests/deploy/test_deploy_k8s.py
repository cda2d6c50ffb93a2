"""deploy/k8s: rendered by kustomize, core kinds validated against the Kubernetes schemas, and the
custom resources (ServiceMonitor, ScaledObject, LeaderWorkerSet) checked field by field for what
the server relies on: ports, probe paths, metric names, /dev/shm, the --dist-init rendezvous.
"""

from __future__ import annotations

import copy
import json
import os
import re
import stat
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

from app.cli import build_parser
from app.settings import Settings
from tests.support.deploy import K8S_VERSION, REPO, contract_problems, k8s_expand, run, tool

K8S = REPO / "deploy" / "k8s"
OVERLAYS = {
    "base": {"Service", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor"},
    "keda": {"Service", "Deployment", "ScaledObject", "PodDisruptionBudget", "ServiceMonitor"},
    "multinode": {
        "Service",
        "LeaderWorkerSet",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
    },
}
CUSTOM_GROUPS = ("monitoring.coreos.com/", "keda.sh/", "leaderworkerset.x-k8s.io/")


@cache
def _render(overlay: str) -> tuple[dict, ...]:
    result = run(tool("kubectl"), "kustomize", str(K8S if overlay == "base" else K8S / overlay))
    assert result.returncode == 0, result.stderr
    return tuple(yaml.safe_load_all(result.stdout))


def render(overlay: str) -> dict[str, dict]:
    """Rendered documents by kind (each kind appears once here), deep-copied for the caller."""
    docs = _render(overlay)
    by_kind = {d["kind"]: copy.deepcopy(d) for d in docs}
    assert len(by_kind) == len(docs)
    return by_kind


def _validate(doc: dict) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate missing: `make install`")
    kv.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_renders_and_core_kinds_validate(overlay: str) -> None:
    docs = render(overlay)
    assert set(docs) == OVERLAYS[overlay]
    for doc in docs.values():
        if not doc["apiVersion"].startswith(CUSTOM_GROUPS):
            _validate(doc)


def test_validation_is_live() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    deployment = render("base")["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readynessProbe"] = container.pop("readinessProbe")  # a typo strict mode must reject
    with pytest.raises(kv.ValidationError):
        _validate(deployment)


def _pod_spec(template: dict) -> dict:
    return template["spec"]


def _container(pod: dict) -> dict:
    return pod["containers"][0]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _check_pod(pod: dict, *, probes: bool) -> None:
    """What every shardserve pod needs: non-root, /dev/shm in memory, time to drain, sane settings."""
    c = _container(pod)
    env = _env(c)
    dockerfile_uid = re.search(r"^ARG UID=(\d+)$", (REPO / "Dockerfile").read_text(), re.M).group(1)
    sec = pod["securityContext"]
    assert sec["runAsNonRoot"] is True and sec["runAsUser"] == int(dockerfile_uid)
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    shm = {v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
    assert any(m["mountPath"] == "/dev/shm" and m["name"] in shm for m in c["volumeMounts"])
    if c["securityContext"].get("readOnlyRootFilesystem"):
        assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    grace = float(env.get("SHARDSERVE_SHUTDOWN_GRACE", Settings.model_fields["shutdown_grace"].default))
    assert pod["terminationGracePeriodSeconds"] > grace
    shardserve_env = {k for k in (e["name"] for e in c["env"]) if k.startswith("SHARDSERVE_")}
    fields = {f"SHARDSERVE_{name.upper()}" for name in Settings.model_fields}
    assert shardserve_env <= fields, "every SHARDSERVE_* variable is a Settings field"
    if probes:
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["http"] == 8000
        assert c["startupProbe"]["httpGet"]["path"] == "/ready"
        assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert c["livenessProbe"]["httpGet"]["path"] == "/health"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["port"] in ports


def _serve_settings(args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Parse a container's command line with the real CLI and build Settings from it and its env."""
    ns = build_parser().parse_args(args)
    assert ns.command == "serve"
    for key in [k for k in os.environ if k.startswith("SHARDSERVE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings(**{k: v for k, v in vars(ns).items() if k in Settings.model_fields})


def test_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render("base")
    deployment = docs["Deployment"]
    pod = _pod_spec(deployment["spec"]["template"])
    _check_pod(pod, probes=True)
    settings = _serve_settings(_container(pod)["args"], _env(_container(pod)), monkeypatch)
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = docs["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    port = service["spec"]["ports"][0]
    assert port["targetPort"] == "http" and port["port"] == 8000
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()

    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "shardserve"}
    metric = hpa["metrics"][0]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "shardserve_requests_waiting"
    assert contract_problems(metric["pods"]["metric"]["name"]) == []


def test_prometheus_adapter_exposes_the_hpa_metric() -> None:
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    rule = values["rules"]["custom"][0]
    assert contract_problems(rule["seriesQuery"]) == []
    hpa_metric = render("base")["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert rule["name"]["as"] == hpa_metric
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}  # a pods metric


def test_service_monitor() -> None:
    docs = render("base")
    sm = docs["ServiceMonitor"]
    assert (sm["apiVersion"], sm["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    service = docs["Service"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    endpoint = sm["spec"]["endpoints"][0]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"


def test_keda_scaled_object_replaces_the_hpa() -> None:
    docs = render("keda")
    so = docs["ScaledObject"]
    assert (so["apiVersion"], so["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    target = so["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target["name"] == docs["Deployment"]["metadata"]["name"]
    trigger = so["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    assert "shardserve_requests_waiting" in query and contract_problems(query) == []
    assert float(trigger["metadata"]["threshold"]) > 0
    assert so["spec"]["minReplicaCount"] >= 1  # never to zero: a cold start loads a model


# ---- multinode: LeaderWorkerSet ------------------------------------------------------------------


def _lws() -> tuple[dict, dict, dict]:
    lws = render("multinode")["LeaderWorkerSet"]
    assert (lws["apiVersion"], lws["kind"]) == ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")
    tpl = lws["spec"]["leaderWorkerTemplate"]
    return lws, tpl["leaderTemplate"], tpl["workerTemplate"]


def test_lws_pod_templates_validate_as_pods() -> None:
    _, leader, worker = _lws()
    for template in (leader, worker):
        _validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": template["spec"]})


def test_lws_group_and_routing() -> None:
    docs = render("multinode")
    lws, leader, worker = _lws()
    # the leader is ready only once workers joined: waiting for it before creating them deadlocks
    assert lws["spec"].get("startupPolicy", "LeaderCreated") == "LeaderCreated"
    assert lws["spec"]["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    _check_pod(_pod_spec(leader), probes=True)
    _check_pod(_pod_spec(worker), probes=False)
    selector = docs["Service"]["spec"]["selector"].items()
    assert selector <= leader["metadata"]["labels"].items()
    assert not selector <= worker["metadata"]["labels"].items(), "workers serve no HTTP"
    assert docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["kind"] == "LeaderWorkerSet"
    pdb_selector = docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items()
    assert pdb_selector <= leader["metadata"]["labels"].items()
    assert pdb_selector <= worker["metadata"]["labels"].items()


def _dist_port(template: dict) -> int:
    return next(p["containerPort"] for p in _container(template["spec"])["ports"] if p["name"] == "dist")


def test_lws_leader_command(monkeypatch: pytest.MonkeyPatch) -> None:
    lws, leader, _ = _lws()
    c = _container(leader["spec"])
    size = lws["spec"]["leaderWorkerTemplate"]["size"]
    env = {**_env(c), "LWS_LEADER_ADDRESS": "shardserve-0.shardserve", "LWS_WORKER_INDEX": "0"}
    args = [k8s_expand(a, env) for a in c["args"]]
    settings = _serve_settings(args, _env(c), monkeypatch)
    assert settings.dist_init == f"tcp://shardserve-0.shardserve:{_dist_port(leader)}"
    assert settings.tp == size * int(env["RANKS_PER_POD"])
    assert settings.host == "0.0.0.0"


def test_lws_worker_command(tmp_path: Path) -> None:
    """Run the worker's shell line with a stub `shardserve` that prints what it was given."""
    lws, leader, worker = _lws()
    c = _container(worker["spec"])
    assert c["command"][:2] == ["/bin/sh", "-c"]
    stub = tmp_path / "shardserve"
    stub.write_text("#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    size = lws["spec"]["leaderWorkerTemplate"]["size"]
    per_pod = int(_env(c)["RANKS_PER_POD"])
    assert _dist_port(worker) == _dist_port(leader)
    for index in range(1, size):
        lws_env = {"LWS_LEADER_ADDRESS": "lead", "LWS_WORKER_INDEX": str(index), "LWS_GROUP_SIZE": str(size)}
        env = {**_env(c), **lws_env}
        script = [k8s_expand(a, env) for a in c["command"][2:] + c["args"]]
        out = subprocess.run(
            ["/bin/sh", "-c", *script],
            env={**env, "PATH": f"{tmp_path}:{os.environ['PATH']}"},
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        assert json.loads(out.stdout) == [
            "rank",
            "--dist-init", f"tcp://lead:{_dist_port(leader)}",
            "--tp", str(size * per_pod),
            "--rank-offset", str(index * per_pod),
            "--local-ranks", str(per_pod),
            "--model", env["SHARDSERVE_MODEL"],
        ]  # fmt: skip
