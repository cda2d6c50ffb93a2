"""/metrics after real traffic, read with prometheus-client's parser, promtool and a real Prometheus."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.api.server import create_app
from app.stack import loader
from tests.support.api_server import LiveServer, tiny_settings
from tests.support.models import tiny_llama

DESIGN = Path(__file__).resolve().parents[3] / "shared" / "DESIGN.md"
KEY = "sk-metrics"
AUTH = {"Authorization": f"Bearer {KEY}"}

# name (without the shardserve_ prefix) -> type, as the contract in shared/DESIGN.md lists them
EXPECTED = {
    "requests_running": "gauge", "requests_waiting": "gauge", "queued_tokens": "gauge",
    "kv_cache_usage_ratio": "gauge", "kv_cache_blocks": "gauge", "prefix_cache_queries": "counter",
    "prefix_cache_hits": "counter", "preemptions": "counter", "prompt_tokens": "counter",
    "generation_tokens": "counter", "requests_finished": "counter", "requests_rejected": "counter",
    "time_to_first_token_seconds": "histogram", "inter_token_latency_seconds": "histogram",
    "time_per_output_token_seconds": "histogram", "e2e_request_latency_seconds": "histogram",
    "queue_time_seconds": "histogram", "request_prompt_tokens": "histogram",
    "request_generation_tokens": "histogram", "batch_size": "histogram", "step_duration_seconds": "histogram",
    "weight_bytes": "gauge", "rank_up": "gauge", "pool_restarts": "counter", "http_requests": "counter",
    "build_info": "gauge", "model_info": "gauge",  # prometheus_client Info, exposed as gauges
}  # fmt: skip


def contract_names() -> set[str]:
    """Metric names from DESIGN.md's Metrics paragraph, with the shardserve_ prefix."""
    text = DESIGN.read_text()
    para = text[text.index("Metrics (all prefixed") :].split("\n\n")[0]
    para = re.sub(r"\([^)]*\)", "", para)  # label values and remarks stand in parentheses
    names = set(re.findall(r"`([a-z_]+)(?:\{[^}]*\})?`", para)) - {"shardserve_"}
    # the parser names a counter's family without its _total suffix
    return {"shardserve_" + n.removesuffix("_total") for n in names}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tiny_llama(tmp_path_factory)
    settings = tiny_settings(path, api_key=[KEY], max_queued_requests=2, max_num_seqs=2)
    with LiveServer(create_app(settings, loader(settings))) as srv:
        deadline = time.monotonic() + 120
        while httpx.get(srv.url + "/ready").status_code != 200:
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        yield srv


def scrape(url: str) -> dict[str, object]:
    text = httpx.get(url + "/metrics").text
    return {f.name: f for f in text_string_to_metric_families(text)}, text


def value(families, name: str, **labels: str) -> float:
    for sample in families[name].samples:
        if sample.name in (name, name + "_total") and all(
            sample.labels.get(k) == v for k, v in labels.items()
        ):
            return sample.value
    return 0.0


def hist_count(families, name: str) -> float:
    return next(s.value for s in families[name].samples if s.name == name + "_count")


def test_every_contract_metric_is_exported_with_its_type(server):
    families, _ = scrape(server.url)
    for short, kind in EXPECTED.items():
        fam = families.get("shardserve_" + short)
        assert fam is not None, short
        assert fam.type == kind, (short, fam.type)
        assert fam.documentation, short
    assert contract_names() <= set(families), contract_names() - set(families)


def test_every_series_carries_the_model_name_label(server):
    """As vLLM's: one Prometheus scraping several servers tells the models apart."""
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as h:  # histograms with samples
        assert h.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200
    families, _ = scrape(server.url)
    samples = [s for f in families.values() for s in f.samples]
    assert len(samples) > 100
    assert {s.labels.get("model_name") for s in samples} == {"tiny"}, [
        s for s in samples if s.labels.get("model_name") != "tiny"
    ][:3]
    # the other labels are still there, beside it
    assert value(families, "shardserve_requests_finished", reason="length", model_name="tiny") >= 1


def test_counters_move_with_real_traffic(server):
    before, _ = scrape(server.url)
    usage = {"prompt": 0, "completion": 0}
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as h:
        for stream in (False, True):
            body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                    "temperature": 0, "stream": stream, "stream_options": {"include_usage": True} if stream else None}  # fmt: skip
            r = h.post("/v1/chat/completions", json={k: v for k, v in body.items() if v is not None})
            assert r.status_code == 200
            if stream:
                u = next(
                    __import__("json").loads(line[6:])["usage"]
                    for line in r.text.splitlines()
                    if line.startswith("data: {") and '"usage"' in line and '"choices":[]' in line
                )
            else:
                u = r.json()["usage"]
            usage["prompt"] += u["prompt_tokens"]
            usage["completion"] += u["completion_tokens"]
        assert (
            h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "temperature": 7}).status_code
            == 400
        )
        assert (
            httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code
            == 401
        )
        # a client that vanishes mid-stream: counted as aborted
        with h.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "a b c", "max_tokens": 200,
                                                       "stream": True, "ignore_eos": True}) as r:  # fmt: skip
            next(r.iter_lines())
        # flood a queue of 2 waiting requests behind 2 seats: some must get 429
        codes: list[int] = []

        def one() -> None:
            with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as c:
                codes.append(c.post("/v1/completions", json={"model": "tiny", "prompt": "p", "max_tokens": 30,
                                                             "ignore_eos": True}).status_code)  # fmt: skip

        threads = [threading.Thread(target=one) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert 429 in codes and 200 in codes
    deadline = time.monotonic() + 30
    while True:
        after, text = scrape(server.url)
        if value(after, "shardserve_requests_finished", reason="abort") > value(
            before, "shardserve_requests_finished", reason="abort"
        ):
            break
        assert time.monotonic() < deadline, "abort never counted"
        time.sleep(0.2)
    ok = codes.count(200)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("shardserve_requests_finished", reason="abort") == 1
    assert delta("shardserve_requests_rejected", reason="invalid") == 1
    assert delta("shardserve_requests_rejected", reason="unauthorized") == 1
    assert delta("shardserve_requests_rejected", reason="queue_full") == codes.count(429)
    assert delta("shardserve_requests_finished", reason="length") == 2 + ok  # the two chats ran to max_tokens
    # every generated token counted once: the two chats' usage, 30 per flood request, the aborted part
    gen = delta("shardserve_generation_tokens")
    assert gen >= usage["completion"] + 30 * ok
    assert (
        hist_count(after, "shardserve_e2e_request_latency_seconds")
        - hist_count(before, "shardserve_e2e_request_latency_seconds")
        == 3 + ok
    )
    assert hist_count(after, "shardserve_time_to_first_token_seconds") > hist_count(
        before, "shardserve_time_to_first_token_seconds"
    )
    assert delta("shardserve_http_requests", route="/v1/chat/completions", status="200") == 2
    assert value(after, "shardserve_rank_up", rank="0") == 1
    assert value(after, "shardserve_weight_bytes", rank="0") > 0
    assert value(after, "shardserve_kv_cache_blocks", state="used") == 0  # all finished: nothing held
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_real_prometheus_scrapes_us(server):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("PROMETHEUS NOT INSTALLED: `make test` installs Debian's prometheus package")
    port = int(server.url.rsplit(":", 1)[1])
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "prometheus.yml"
        cfg.write_text(
            "global: {scrape_interval: 1s}\nscrape_configs:\n  - job_name: shardserve\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n"
        )
        from tests.support.api_server import free_port

        prom_port = free_port()
        proc = subprocess.Popen(
            [prometheus, f"--config.file={cfg}", f"--storage.tsdb.path={d}/data",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as h:
                h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3})
            deadline = time.monotonic() + 60
            while True:
                try:
                    r = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/query",
                                  params={"query": "sum(shardserve_generation_tokens_total)"})  # fmt: skip
                    result = r.json()["data"]["result"]
                    if result and float(result[0]["value"][1]) > 0:
                        break
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
                assert time.monotonic() < deadline, "Prometheus never saw our metrics"
                time.sleep(0.5)
        finally:
            proc.terminate()
            proc.wait(10)


def _exported_sample_names(text: str) -> set[str]:
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_every_dashboard_and_alert_query_names_an_exported_series(server):
    """The Grafana panels and alert rules query series this server really exports."""
    import json

    import yaml

    from tests.support.deploy import REPO, promql_selectors

    _, text = scrape(server.url)
    exported = _exported_sample_names(text)
    exprs = []
    dashboard = json.loads((REPO / "deploy/grafana/dashboards/shardserve.json").read_text())
    stack = [dashboard]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    for group in yaml.safe_load((REPO / "deploy/prometheus/alerts.yml").read_text())["groups"]:
        exprs.extend(rule["expr"] for rule in group["rules"])
    assert len(exprs) > 20
    names = {s.metric for e in exprs for s in promql_selectors(e)[0] if s.metric.startswith("shardserve_")}
    missing = sorted(n for n in names if n not in exported)
    assert not missing, missing
