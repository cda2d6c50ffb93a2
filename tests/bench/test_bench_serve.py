"""`shardserve bench serve`: the metric arithmetic on hand-computed timestamps, a run against a
live tiny-model shardserve checked against the server's own Prometheus counters, and a run
against a scripted server whose failures must show in the exit code."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client.parser import text_string_to_metric_families

from app.bench import serve
from app.bench.metrics_math import RequestRecord, parse_goodput, percentile, summarize, tpot
from tests.support.api_server import LiveServer, live_app, started_stack, tiny_settings
from tests.support.models import tiny_llama

# Four requests, times in seconds; the figures in the tests are worked out by hand from these.
# A: 4 tokens in 4 chunks; B: 3 tokens in 2 chunks (two arrived together); C: one token; D failed.
FIXTURE = [
    RequestRecord(True, 0.0, (0.5, 0.6, 0.8, 1.0), prompt_tokens=10, output_tokens=4),
    RequestRecord(True, 1.0, (1.2, 1.5), prompt_tokens=20, output_tokens=3),
    RequestRecord(True, 2.0, (3.0,), prompt_tokens=0, output_tokens=1),
    RequestRecord(False, 3.0, (), prompt_tokens=5, error="HTTP 500"),
]


def test_metrics_on_hand_computed_fixture() -> None:
    m = summarize(FIXTURE, duration_s=4.0)
    assert (m["completed"], m["failed"]) == (3, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (30, 8)  # D's prompt does not count
    assert m["request_throughput"] == pytest.approx(0.75)
    assert m["output_throughput"] == pytest.approx(2.0)
    assert m["total_token_throughput"] == pytest.approx(9.5)
    assert m["request_goodput"] is None
    # TTFT 0.5, 0.2, 1.0 s: p99 sits 98% of the way from 0.5 to 1.0
    assert m["mean_ttft_ms"] == pytest.approx(1700 / 3)
    assert m["median_ttft_ms"] == pytest.approx(500)
    assert m["p99_ttft_ms"] == pytest.approx(990)
    assert m["std_ttft_ms"] == pytest.approx(1000 * (0.98 / 9) ** 0.5)
    # TPOT: A (1.0 - 0.5) / 3, B (0.5 - 0.2) / 2; C has one token and no TPOT
    assert tpot(FIXTURE[0]) == pytest.approx(1 / 6) and tpot(FIXTURE[2]) is None
    assert m["mean_tpot_ms"] == pytest.approx((1000 / 6 + 150) / 2)
    assert m["median_tpot_ms"] == pytest.approx((1000 / 6 + 150) / 2)
    assert m["p99_tpot_ms"] == pytest.approx(150 + (1000 / 6 - 150) * 0.99)
    # ITL pools every gap: 0.1, 0.2, 0.2 from A and 0.3 from B
    assert m["mean_itl_ms"] == pytest.approx(200)
    assert m["median_itl_ms"] == pytest.approx(200)
    assert m["p99_itl_ms"] == pytest.approx(297)
    # E2EL 1.0, 0.5, 1.0
    assert m["mean_e2el_ms"] == pytest.approx(2500 / 3)
    assert m["median_e2el_ms"] == pytest.approx(1000)
    assert m["p99_e2el_ms"] == pytest.approx(1000)


@pytest.mark.parametrize(
    ("slos", "good"),
    [
        (["ttft:600", "tpot:160"], 1),  # A's TPOT 166.7 ms is over, C's TTFT 1 s is over: B only
        (["ttft:1000"], 3),  # an SLO holds at equality: C's TTFT is exactly 1 s
        (["tpot:100"], 1),  # C's single token counts as TPOT 0 (vLLM's rule); A and B are over
        (["e2el:999"], 1),  # only B finished within 999 ms
    ],
)
def test_goodput(slos: list[str], good: int) -> None:
    m = summarize(FIXTURE, duration_s=4.0, slos=parse_goodput(slos))
    assert m["request_goodput"] == pytest.approx(good / 4.0)


def test_percentile_matches_numpy() -> None:
    rng = random.Random(0)
    for n in (1, 2, 3, 10, 101):
        xs = [rng.random() for _ in range(n)]
        for p in (0, 1, 50, 90, 99, 100):
            assert percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)))


@pytest.mark.parametrize("bad", ["ttft", "ttft:", "ttft:abc", "latency:10", "tpot:-1"])
def test_goodput_rejects_malformed_slos(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_goodput([bad])


def test_no_completed_requests_gives_none_not_zero() -> None:
    m = summarize(FIXTURE[3:], duration_s=1.0)
    assert (m["completed"], m["failed"], m["output_throughput"]) == (0, 1, 0.0)
    assert m["mean_ttft_ms"] is None and m["p99_itl_ms"] is None


@pytest.fixture(scope="module")
def shardserve(tmp_path_factory):
    settings = tiny_settings(tiny_llama(tmp_path_factory, max_pos=256), max_num_seqs=4)
    with started_stack(settings) as runtime, live_app(settings, runtime) as srv:
        yield srv


def _generation_tokens(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name == "shardserve_generation_tokens":
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
    raise AssertionError("shardserve_generation_tokens_total not exported")


def test_bench_serve_against_live_shardserve(shardserve, tmp_path, capsys) -> None:
    before = _generation_tokens(shardserve.url)
    out = tmp_path / "r.json"
    argv = ["--base-url", shardserve.url, "--num-prompts", "6", "--max-concurrency", "3", "--input-len", "16",
            "--output-len", "8", "--ignore-eos", "--seed", "1", "--goodput", "ttft:60000", "tpot:60000",
            "--no-progress", "--json", str(out)]  # fmt: skip
    assert serve.main(argv) == 0
    r = json.loads(out.read_text())
    assert (r["completed"], r["failed"], r["num_prompts"], r["max_concurrency"]) == (6, 0, 6, 3)
    assert r["model"] == "tiny"  # the first of /v1/models
    assert r["output_token_source"] == {"usage": 6}
    assert "/tokenize" in r["prompt_token_source"]
    # the server generated what the client counted: 6 timed requests + 1 warm-up, 8 tokens each
    assert _generation_tokens(shardserve.url) - before == 7 * 8
    assert r["output_lens"] == [8] * 6 and r["total_output_tokens"] == 48
    assert all(14 <= n <= 20 for n in r["input_lens"]), r["input_lens"]  # 16 words sized by /tokenize
    assert r["output_throughput"] == pytest.approx(48 / r["duration"])
    assert r["request_goodput"] == pytest.approx(6 / r["duration"])
    assert all(t > 0 for t in r["ttfts"]) and all(len(gaps) <= 7 for gaps in r["itls"])
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < r[f"median_{name}_ms"] <= r[f"p99_{name}_ms"]
    assert r["median_e2el_ms"] >= r["median_ttft_ms"]
    printed = capsys.readouterr().out
    assert "| TPOT |" in printed and "output tokens counted by | usage: 6" in printed


def test_bench_serve_chat_endpoint(shardserve, tmp_path) -> None:
    out = tmp_path / "r.json"
    argv = ["--base-url", shardserve.url, "--endpoint", "chat", "--num-prompts", "2", "--input-len", "8",
            "--output-len", "4", "--ignore-eos", "--warmup", "0", "--no-progress", "--json", str(out)]  # fmt: skip
    assert serve.main(argv) == 0
    r = json.loads(out.read_text())
    assert (r["completed"], r["total_output_tokens"]) == (2, 8)
    # usage counts the chat template's tokens too: more than the 8 of the user's text
    assert all(n > 8 for n in r["input_lens"])


def scripted_server() -> FastAPI:
    """Request i: i % 3 == 1 answers 500, i % 3 == 2 drops the stream before [DONE], the rest
    stream 'a b c ' in three chunks, 200 ms before the first and 50 ms apart, without usage.
    /tokenize speaks llama.cpp's shape (one token per word)."""
    app = FastAPI()
    count = {"n": 0}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "scripted", "object": "model"}]}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        body = await request.json()
        if "content" not in body:
            return JSONResponse({"error": "content is required"}, status_code=400)
        return JSONResponse({"tokens": list(range(len(body["content"].split())))})

    @app.post("/v1/completions")
    async def completions() -> object:
        i = count["n"]
        count["n"] += 1
        if i % 3 == 1:
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)

        async def events():
            await asyncio.sleep(0.2)
            for k, word in enumerate("abc"):
                if k:
                    await asyncio.sleep(0.05)
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': word + ' '}]})}\n\n"
            if i % 3 != 2:
                yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def test_failures_set_the_exit_code(tmp_path) -> None:
    out = tmp_path / "r.json"
    with LiveServer(scripted_server()) as srv:
        argv = ["--base-url", srv.url, "--num-prompts", "6", "--max-concurrency", "1", "--input-len", "5",
                "--output-len", "3", "--warmup", "0", "--no-progress", "--json", str(out)]  # fmt: skip
        assert serve.main(argv) == 1
    r = json.loads(out.read_text())
    assert (r["completed"], r["failed"]) == (2, 4)
    assert sum("HTTP 500" in e for e in r["errors"]) == 2
    assert sum("without data: [DONE]" in e for e in r["errors"]) == 2
    # no usage: output tokens re-counted with the server's /tokenize (llama.cpp's request shape)
    assert r["output_token_source"] == {"tokenize": 2} and "llama.cpp" in r["prompt_token_source"]
    assert r["output_lens"][0] == 3 and r["input_lens"][0] == 5
    # the server's own delays bound the client's figures from below
    assert 200 <= r["median_ttft_ms"] < 1500 and 50 <= r["median_itl_ms"] < 500
    assert r["median_tpot_ms"] == pytest.approx(r["median_itl_ms"], rel=0.5)


def test_a_failed_warmup_stops_the_run_with_exit_code_1(tmp_path) -> None:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions() -> JSONResponse:
        return JSONResponse({"error": {"message": "no"}}, status_code=503)

    with LiveServer(app) as srv:
        assert serve.main(["--base-url", srv.url, "--model", "m", "--no-progress"]) == 1


def test_naive_server_serves_one_request_at_a_time(tmp_path_factory, tmp_path) -> None:
    from app.bench.naive_server import create_naive_app

    out = tmp_path / "r.json"
    with LiveServer(create_naive_app(tiny_llama(tmp_path_factory, max_pos=256), "naive")) as srv:
        for endpoint in ("completions", "chat"):
            argv = ["--base-url", srv.url, "--endpoint", endpoint, "--num-prompts", "2", "--max-concurrency", "2",
                    "--input-len", "8", "--output-len", "6", "--ignore-eos", "--no-progress", "--json", str(out)]  # fmt: skip
            assert serve.main(argv) == 0
            r = json.loads(out.read_text())
            assert (r["completed"], r["output_lens"], r["output_token_source"]) == (2, [6, 6], {"usage": 2})
            assert r["model"] == "naive" and "vllm shape" in r["prompt_token_source"]
            # sent together, served in turn: the later first token comes after the earlier request ended
            (_, first_e2el), (second_ttft, _) = sorted(zip(r["ttfts"], r["latencies"], strict=True))
            assert second_ttft >= first_e2el - 0.01


def test_running_stops_the_server_and_what_it_spawned(tmp_path) -> None:
    import sys

    from app.bench import servers
    from tests.support.api_server import free_port, process_gone, wait_for

    script = (
        "import http.server, subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        "open(sys.argv[3], 'w').write(str(child.pid))\n"
        "http.server.HTTPServer(('127.0.0.1', int(sys.argv[2])), http.server.SimpleHTTPRequestHandler).serve_forever()\n"
    )
    pidfile = tmp_path / "child.pid"
    spec = servers.ServerSpec(
        "toy", (sys.executable, "-c", script, "--port", str(free_port()), str(pidfile)), "/"
    )
    with servers.running(spec, tmp_path / "toy.log") as base:
        assert httpx.get(base + "/").status_code == 200
        child = int(pidfile.read_text())
        assert not process_gone(child)
    assert wait_for(lambda: process_gone(child), timeout=10)

    dead = servers.ServerSpec(
        "dead", (sys.executable, "-c", "print('no model'); raise SystemExit(3)", "--port", "1"), "/"
    )
    with (
        pytest.raises(RuntimeError, match=r"exited \(3\)[\s\S]*no model"),
        servers.running(dead, tmp_path / "d.log"),
    ):
        pass


def _row(system: str, workload: str, tok_s: float, tpot_ms: float) -> dict:
    result = {"completed": 4, "failed": 0, "output_throughput": tok_s, "request_throughput": tok_s / 128,
              "median_ttft_ms": 100.0, "p99_ttft_ms": 200.0, "median_tpot_ms": tpot_ms, "p99_tpot_ms": tpot_ms,
              "median_itl_ms": tpot_ms, "median_e2el_ms": 1000.0}  # fmt: skip
    return {"system": system, "workload": {"name": workload}, "command": "x", "result": result}


def test_report_section_replaces_only_the_marked_part(tmp_path) -> None:
    from app.bench.report import plan
    from app.bench.report_render import BEGIN, END, render, targets, write_charts, write_section

    results = [_row("shardserve", "c1", 40.0, 15.0), _row("llama.cpp", "c1", 80.0, 10.0),
               _row("shardserve", "c16", 150.0, 90.0), _row("llama.cpp", "c16", 100.0, 140.0),
               {"system": "vLLM", "workload": {"name": "c16"}, "command": "y", "error": "did not start"}]  # fmt: skip
    lines = "\n".join(targets(results))
    assert "150.0 vs 100.0 tok/s = **1.50×** (target ≥ 1.2×, aim 1.5×): met" in lines
    assert "15.0 vs 10.0 ms = **1.50×** (target ≤ 1.5×, aim 1.25×): met" in lines  # the bound is inclusive
    assert "vLLM" not in lines  # no figure, no claim
    charts = write_charts(results, tmp_path / "docs" / "bench")
    assert [p.read_bytes()[:8] for p in charts] == [b"\x89PNG\r\n\x1a\n"] * 2
    rows = [{"dtype": "fp32", "bytes": 538_000_000, "floor_ms": 16.8, "max_tok_s": 59.5}]
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nhand-written intro\n")
    for run in range(2):
        section = render(results, plan(quick=False), rows, 32.0, {"shardserve": "0.1.0"}, {"naive": "not set up"},
                         charts, tmp_path, {}, quick=False, elapsed_s=60.0 * (run + 1))  # fmt: skip
        write_section(doc, section)
        doc.write_text(doc.read_text() + ("hand-written outro\n" if run == 0 else ""))
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written intro\n") and text.endswith(
        f"{END}\nhand-written outro\n"
    )
    assert text.count(BEGIN) == 1 and "took 2 min" in text and "took 1 min" not in text
    assert "![throughput](docs/bench/throughput.png)" in text and "Not measured: naive (not set up)" in text
    assert "| vLLM | failed: did not start |" in text
    rerun = render(results, plan(quick=False), rows, 32.0, {}, {}, charts, tmp_path, {}, quick=False,
                   elapsed_s=60.0, reran=["vLLM"])  # fmt: skip
    assert "second invocation (`--rerun`): vLLM" in rerun


def test_arrivals_all_at_once_or_poisson_over_n_over_rate() -> None:
    assert serve.arrival_offsets(4, float("inf"), random.Random(0)) == [0.0] * 4
    t = serve.arrival_offsets(50, 10.0, random.Random(0))
    assert t == sorted(t) and t[0] > 0 and t[-1] == pytest.approx(5.0)  # 50 requests at 10/s: 5 s
    gaps = np.diff([0.0, *t])
    assert 0.3 < np.std(gaps) / np.mean(gaps) < 2.0  # exponential gaps: coefficient of variation about 1


def test_bench_serve_dataset_file(shardserve, tmp_path) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "time year people", "output_len": 3}\n"a plain string prompt"\n')
    out = tmp_path / "r.json"
    argv = ["--base-url", shardserve.url, "--dataset", str(data), "--num-prompts", "3", "--output-len", "5",
            "--ignore-eos", "--warmup", "0", "--no-progress", "--json", str(out)]  # fmt: skip
    assert serve.main(argv) == 0
    r = json.loads(out.read_text())
    assert r["output_lens"] == [3, 5, 3]  # the file's output_len, else --output-len; prompts cycle


def test_llama_cpp_is_built_for_a_named_isa_never_native_nor_amx() -> None:
    from app.bench.peers import llama_isa_flags

    amd = llama_isa_flags({"avx2", "fma", "f16c"})
    intel = llama_isa_flags({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                             "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"})  # fmt: skip
    for flags in (amd, intel):
        assert "-DGGML_NATIVE=OFF" in flags and "-DGGML_AVX2=ON" in flags
        assert not [f for f in flags if "AMX" in f and f.endswith("=ON")]
    assert "-DGGML_AVX512=ON" in intel and "-DGGML_AVX512=ON" not in amd
