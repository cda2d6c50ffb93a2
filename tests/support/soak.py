"""`make soak`: sustained mixed load against a real `shardserve serve` process, then a verdict.

    python -m tests.support.soak [--minutes 10] [--concurrency 12] [--idle-connections 300] [--rss-bound-mb 100]
                         [--model M] [--json OUT]

Clients loop until the time is up, each request one of: a whole completion or chat, a streamed one
read to the end, a streamed one abandoned at a random point, an invalid request (expects a 4xx).
Lengths are random. After the first minute (the warm-up), beside the load, --idle-connections
sockets hold connections without a request (tests/support/soak_idle.py: nothing sent, partial request lines
and headers, slowloris, half-closed, reset), more than the server's --max-connections, while /health
is probed. At the end: requests by outcome, errors by kind, TTFT/TPOT p50/p99 in the first and the
last minute (drift), the idle connections' lifetimes, /health latency, and the server's RSS growth
after the first minute.

Fails (exit 1) when a request was lost (no answer, or a stream that ended without a finish_reason or
an error event), when valid input got a 5xx or any other unexpected status, when the server's RSS grew
more than --rss-bound-mb, when the server is not ready and idle once the load stops, when an idle
connection outlived the head deadline, or when a /health probe failed or took over 2 s."""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.api_server import free_port
from tests.support.soak_idle import IdleTally, hold_idle_connections

HEAD_TIMEOUT = 10.0  # the server's default --request-head-timeout
MAX_CONNECTIONS = 256  # below --idle-connections + the clients: the cap's eviction is exercised too
PROMPTS = ["Tell me about the sea.", "Write a haiku about rain.", "What is 12 times 7?", "Name three rivers.",
           "Explain what a CPU does.", "Say hello in French.", "Describe a cat in one sentence."]  # fmt: skip
INVALID = [
    {"prompt": "x", "temperature": -1},
    {"prompt": "x", "max_tokens": 10**9},
    {"messages": []},
    {"prompt": [10**9]},
    {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}}},
]


@dataclass
class Tally:
    t0: float
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    errors: collections.Counter = field(default_factory=collections.Counter)
    lost: list[str] = field(default_factory=list)
    samples: list[tuple[float, float, float]] = field(default_factory=list)  # (time, ttft, tpot)


async def one(ac: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    kind = rng.choices(["whole", "stream", "abandon", "invalid"], weights=[3, 4, 2, 1])[0]
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    prompt = rng.choice(PROMPTS)
    body: dict = {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
    body |= {"max_tokens": rng.randint(4, 96), "temperature": rng.choice([0, 0.8])}
    if kind == "invalid":
        bad = rng.choice(INVALID)
        r = await ac.post("/v1/completions" if "prompt" in bad else "/v1/chat/completions", json=bad)
        tally.outcomes["invalid"] += 1
        if not 400 <= r.status_code < 500:
            tally.errors[f"invalid input got {r.status_code}"] += 1
        return
    t_start = time.monotonic()
    if kind == "whole":
        r = await ac.post(path, json=body)
        _status(r.status_code, tally, kind)
        if r.status_code == 200 and not r.json()["choices"][0].get("finish_reason"):
            tally.lost.append(f"whole response without finish_reason: {r.text[:200]}")
        return
    body["stream"] = True
    async with ac.stream("POST", path, json=body) as r:
        if not _status(r.status_code, tally, kind):
            await r.aread()
            return
        stop_after = rng.randint(1, 20) if kind == "abandon" else None
        chunks, first, finished, done = 0, None, False, False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                tally.errors[f"stream error event: {event['error'].get('code')}"] += 1
                finished = True
                continue
            chunks += 1
            first = first or time.monotonic()
            finished = finished or any(c.get("finish_reason") for c in event["choices"])
            if stop_after is not None and chunks >= stop_after:
                return  # the client vanishes
        if not (done and finished):
            tally.lost.append(f"stream ended without finish_reason or [DONE] ({chunks} chunks)")
        elif first is not None and chunks > 2:
            now = time.monotonic()
            tally.samples.append((now - tally.t0, first - t_start, (now - first) / (chunks - 2)))


def _status(code: int, tally: Tally, kind: str) -> bool:
    tally.outcomes[f"{kind} {code}"] += 1
    if code in (200, 429):  # 429: the queue is full by design under this load
        return code == 200
    tally.errors[f"valid {kind} request got {code}"] += 1
    return False


async def load(url: str, minutes: float, concurrency: int, seed: int) -> Tally:
    tally = Tally(time.monotonic())
    end = tally.t0 + minutes * 60

    async def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        async with httpx.AsyncClient(base_url=url, timeout=300) as ac:
            while time.monotonic() < end:
                try:
                    await one(ac, rng, tally)
                except httpx.HTTPError as e:
                    tally.lost.append(f"{type(e).__name__}: {e}")

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return tally


async def measured(
    url: str, minutes: float, a: argparse.Namespace, seed: int
) -> tuple[Tally, IdleTally | None]:
    """The load after the warm-up, with the idle connections beside it for the same time."""
    if not a.idle_connections:
        return await load(url, minutes, a.concurrency, seed), None
    return await asyncio.gather(
        load(url, minutes, a.concurrency, seed),
        hold_idle_connections(url, a.idle_connections, HEAD_TIMEOUT, minutes, seed),
    )


def _pcts(values: list[float]) -> str:
    if not values:
        return "n/a"
    q = statistics.quantiles(values, n=100) if len(values) > 1 else [values[0]] * 99
    return f"p50 {statistics.median(values) * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms"


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.support.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=12)
    p.add_argument("--idle-connections", type=int, default=300, help="held beside the load (0: none)")
    p.add_argument("--rss-bound-mb", type=float, default=100.0)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "app", "serve", "--model", a.model, "--port", str(port), "--max-num-seqs", "8",
           "--max-queued-requests", "8", "--max-connections", str(MAX_CONNECTIONS),
           "--request-head-timeout", str(HEAD_TIMEOUT)]  # fmt: skip
    server = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            print("soak: the server did not become ready")
            return 1
        print(
            f"soak: {a.minutes:g} min of mixed load, {a.concurrency} clients, against {' '.join(cmd)}",
            flush=True,
        )
        warm = asyncio.run(load(url, min(1.0, a.minutes), a.concurrency, a.seed))
        rss0 = _rss(server.pid)
        tally, held = asyncio.run(measured(url, max(0.0, a.minutes - 1.0), a, a.seed + 1))
        rss1 = _rss(server.pid)
        idle = httpx.get(url + "/metrics").text
        running = [
            ln
            for ln in idle.splitlines()
            if ln.startswith(("shardserve_requests_running ", "shardserve_requests_waiting "))
        ]
        settled = (
            all(float(ln.split()[-1]) == 0 for ln in running) and httpx.get(url + "/ready").status_code == 200
        )
    finally:
        server.terminate()
        server.wait(30)
    both = Tally(warm.t0, warm.outcomes + tally.outcomes, warm.errors + tally.errors, warm.lost + tally.lost,
                 warm.samples + [(t + 60, x, y) for t, x, y in tally.samples])  # fmt: skip
    end = max((s[0] for s in both.samples), default=0)
    first = [s for s in both.samples if s[0] <= 60]
    last = [s for s in both.samples if s[0] >= end - 60]
    report = {
        "minutes": a.minutes, "concurrency": a.concurrency, "requests": sum(both.outcomes.values()),
        "outcomes": dict(both.outcomes), "errors": dict(both.errors), "lost": both.lost[:20],
        "ttft_first_minute": _pcts([s[1] for s in first]), "ttft_last_minute": _pcts([s[1] for s in last]),
        "tpot_first_minute": _pcts([s[2] for s in first]), "tpot_last_minute": _pcts([s[2] for s in last]),
        "rss_after_warmup_mb": rss0 / 2**20, "rss_end_mb": rss1 / 2**20, "rss_growth_mb": (rss1 - rss0) / 2**20,
        "idle_and_ready_after": settled, "idle_connections": held.report() if held else None,
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))
    ok = not both.lost and not both.errors and report["rss_growth_mb"] <= a.rss_bound_mb and settled
    ok = ok and (held is None or held.ok)
    print("soak: PASS" if ok else "soak: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
