"""The idle and half-open connection phase of `make soak`, run beside the mixed load.

Up to `slots` loopback connections that never complete a request head, each reopened as soon as
the server closes it: connections that send nothing, part of a request line, part of the headers,
a byte every second (slowloris), part of a head and then a half-close (shutdown of the write side),
and part of a head and then a reset (SO_LINGER 0). Meanwhile /health is probed twice a second.

What must hold: every such connection is closed by the server, at the latest at the head deadline
(plus slack) or earlier to make room when the connection cap is reached; every probe answers 200
within PROBE_LIMIT seconds; and the mixed load beside it loses nothing (checked by tests/support/soak.py)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import socket
import statistics
import struct
import time
from dataclasses import dataclass, field

import httpx

KINDS = ("nothing", "partial line", "partial headers", "slowloris", "half-closed", "reset")
PROBE_INTERVAL = 0.5
PROBE_LIMIT = 2.0  # seconds a /health probe may take while the sockets are held
SLACK = 3.0  # seconds past the head deadline a connection may live (loop delays on 2 busy cores)


@dataclass
class IdleTally:
    opened: collections.Counter = field(default_factory=collections.Counter)
    lifetimes: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    overdue: list[str] = field(default_factory=list)  # connections that outlived the deadline
    probes: list[float] = field(default_factory=list)
    probe_failures: list[str] = field(default_factory=list)

    def report(self) -> dict:
        def spread(values: list[float]) -> str:
            if not values:
                return "n/a"
            return f"p50 {statistics.median(values):.1f} s, max {max(values):.1f} s"

        return {
            "opened": dict(self.opened),
            "lifetime": {k: spread(v) for k, v in self.lifetimes.items()},
            "overdue": self.overdue[:20],
            "health_probes": len(self.probes),
            "health_p99_ms": round(sorted(self.probes)[int(len(self.probes) * 0.99)] * 1000) if self.probes else None,
            "health_max_ms": round(max(self.probes) * 1000) if self.probes else None,
            "health_failures": self.probe_failures[:20],
        }  # fmt: skip

    @property
    def ok(self) -> bool:
        return not self.overdue and not self.probe_failures


async def _hold(port: int, kind: str, deadline: float, tally: IdleTally) -> None:
    """One connection of `kind`, held until the server closes it (or it resets itself)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    tally.opened[kind] += 1
    try:
        if kind == "partial line":
            writer.write(b"POST /v1/chat/comp")
        elif kind == "partial headers":
            writer.write(b"GET /v1/models HTTP/1.1\r\nHost: soak\r\nAuthorization: Bearer x")
        elif kind in ("half-closed", "reset"):
            writer.write(b"GET /health HTTP/1.1\r\nHo")
            await writer.drain()
            if kind == "half-closed":
                writer.write_eof()
            else:
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.close()  # a reset, not a FIN: the client vanished
                return
        if kind == "slowloris":
            for byte in b"GET /health HTTP/1.1\r\nHost: soak\r\nX-Slow: " * 10:
                writer.write(bytes([byte]))
                with contextlib.suppress(asyncio.TimeoutError):
                    if await asyncio.wait_for(reader.read(1 << 16), 1.0) == b"":
                        break  # closed by the server
        else:
            await writer.drain()
            while await reader.read(1 << 16):
                pass
        lived = time.monotonic() - t0
        tally.lifetimes[kind].append(lived)
        if lived > deadline + SLACK:
            tally.overdue.append(f"{kind}: {lived:.1f} s")
    except (ConnectionError, OSError):
        tally.lifetimes[kind].append(time.monotonic() - t0)
    finally:
        writer.close()


async def _slot(
    port: int, kinds: list[str], deadline: float, end: float, tally: IdleTally, rng: random.Random
) -> None:
    while time.monotonic() < end:
        for kind in kinds:
            if time.monotonic() >= end:
                return
            # a pause before reopening: beyond the cap every new connection closes an older one, and
            # slots that reconnect at once churn thousands of connections a second (a flood, which
            # the server survives, but not the load this phase is meant to sit beside)
            await asyncio.sleep(rng.uniform(0.5, 1.5))
            try:
                await asyncio.wait_for(_hold(port, kind, deadline, tally), deadline + 2 * SLACK)
            except asyncio.TimeoutError:
                tally.overdue.append(f"{kind}: still open after {deadline + 2 * SLACK:.0f} s")
            except OSError as e:  # could not even connect
                tally.overdue.append(f"{kind}: {e}")
                await asyncio.sleep(1)


async def _probe(url: str, end: float, tally: IdleTally) -> None:
    async with httpx.AsyncClient(timeout=10) as ac:
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                r = await ac.get(url + "/health", headers={"Connection": "close"})
                took = time.monotonic() - t0
                tally.probes.append(took)
                if r.status_code != 200 or took > PROBE_LIMIT:
                    tally.probe_failures.append(f"{r.status_code} in {took:.2f} s")
            except httpx.HTTPError as e:
                tally.probe_failures.append(f"{type(e).__name__} after {time.monotonic() - t0:.2f} s")
            await asyncio.sleep(PROBE_INTERVAL)


async def hold_idle_connections(
    url: str, slots: int, head_deadline: float, minutes: float, seed: int
) -> IdleTally:
    """The phase: `slots` connections cycling through KINDS for `minutes`, and the probes."""
    port = int(url.rsplit(":", 1)[1])
    tally = IdleTally()
    end = time.monotonic() + minutes * 60
    rng = random.Random(seed)
    orders = [rng.sample(KINDS, len(KINDS)) for _ in range(slots)]
    held = (_slot(port, o, head_deadline, end, tally, random.Random(rng.random())) for o in orders)
    await asyncio.gather(_probe(url, end, tally), *held)
    return tally
