"""`shardserve bench report` (the last step of `make bench`): the serve workloads against shardserve
and each peer, one system after another on the same machine, written into BENCHMARKS.md between
`<!-- bench:begin -->` and `<!-- bench:end -->` (the rest of the file is hand-written) with PNG
charts beside it.

Workloads (128 output tokens, ignore_eos, greedy, completions endpoint): concurrency 1, 4, 16 and
64 with 128-token prompts; a shared-system-prompt workload (384 shared + 64 own tokens, 16
streams: prefix caching); a long-prompt workload (512 tokens, 16 streams: TTFT under load).
--quick runs the 16-stream workloads only, with fewer requests. llama-server is restarted for
each concurrency with as many slots (-np); the others serve every workload from one start. The
naive server handles one request at a time, so it runs the 1- and 16-stream workloads only."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from app.bench import servers
from app.bench.peers import bench_dir, is_set_up, parse_peers, setup
from app.bench.report_render import render, write_charts, write_section
from app.bench.roofline import DEFAULT_BANDWIDTH_GBS, roofline
from app.bench.serve import ServeConfig, run

ROOT = Path(__file__).resolve().parents[2]
FULL_RUN_WARNING = (
    "make bench: the full run takes an hour or more (kernels, engine, then every serve workload against "
    "shardserve and each peer; building llama.cpp or installing vLLM the first time adds 15+ minutes each). "
    "QUICK=1 runs a short version in a few minutes once the peers are set up."
)


@dataclass(frozen=True)
class Workload:
    name: str
    concurrency: int
    num_prompts: int
    input_len: int
    output_len: int = 128
    prefix_len: int = 0


def plan(quick: bool) -> list[Workload]:
    if quick:
        return [Workload("c16", 16, 32, 128), Workload("prefix", 16, 16, 64, prefix_len=384),
                Workload("long", 16, 16, 512)]  # fmt: skip
    return [Workload("c1", 1, 8, 128), Workload("c4", 4, 16, 128), Workload("c16", 16, 48, 128),
            Workload("c64", 64, 128, 128), Workload("prefix", 16, 48, 64, prefix_len=384),
            Workload("long", 16, 48, 512)]  # fmt: skip


# (report name, extra `shardserve serve` options, workloads): the dtype and TP targets, full run only
VARIANTS = [("shardserve bf16", ("--dtype", "bf16"), ("c1",)), ("shardserve tp2", ("--tp", "2"), ("c16",))]


def groups(
    system: str, workloads: list[Workload], model: Path, root: Path
) -> list[tuple[Callable, list[Workload]]]:
    """(server spec maker taking a port, the workloads it serves) in run order."""
    top = max(w.concurrency for w in workloads)
    if system == "shardserve":
        return [(lambda port: servers.shardserve(model, port, max(top, 16)), workloads)]
    if system == "llama.cpp":
        by_c: dict[int, list[Workload]] = {}
        for w in workloads:
            by_c.setdefault(w.concurrency, []).append(w)
        return [(lambda port, c=c: servers.llama(root, model, port, c), ws) for c, ws in sorted(by_c.items())]
    if system == "vLLM":
        return [(lambda port: servers.vllm(root, port, max(top, 16)), workloads)]
    if system == "naive":
        return [(lambda port: servers.naive(root, port), [w for w in workloads if w.name in ("c1", "c16")])]
    for name, extra, names in VARIANTS:
        if system == name:
            mine = [w for w in workloads if w.name in names]
            return (
                [(lambda port, extra=extra: servers.shardserve(model, port, 16, extra), mine)] if mine else []
            )
    raise ValueError(system)


def run_system(system: str, workloads: list[Workload], model: Path, root: Path, results: list[dict]) -> None:
    out_dir = root / "results" / "serve"
    out_dir.mkdir(parents=True, exist_ok=True)
    for make_spec, ws in groups(system, workloads, model, root):
        spec = make_spec(servers.free_port())
        print(f"\n== {system}: {', '.join(w.name for w in ws)}\n   $ {spec.command}", flush=True)
        try:
            with servers.running(spec, root / "logs" / f"{system.replace(' ', '-')}.log") as base:
                for w in ws:
                    cfg = ServeConfig(base, None, "completions", w.num_prompts, w.concurrency, float("inf"),
                                      w.input_len, w.output_len, w.prefix_len, ignore_eos=True)  # fmt: skip
                    row = {"system": system, "workload": asdict(w), "command": spec.command}
                    try:
                        r = asyncio.run(run(cfg, progress=True))
                        (out_dir / f"{system.replace(' ', '-')}-{w.name}.json").write_text(
                            json.dumps(r, indent=1)
                        )
                        row["result"] = {k: v for k, v in r.items() if not isinstance(v, list)}
                    except Exception as e:  # one failed workload must not lose the rest of the run
                        row["error"] = f"{type(e).__name__}: {e}"
                    print(f"   {w.name}: {_brief(row)}", flush=True)
                    results.append(row)
        except RuntimeError as e:
            for w in ws:
                results.append(
                    {"system": system, "workload": asdict(w), "command": spec.command, "error": str(e)}
                )
            print(f"   {system} did not start: {e}", file=sys.stderr)


def _brief(row: dict) -> str:
    if "error" in row:
        return "FAILED " + row["error"][:200]
    r = row["result"]
    return (f"{r['output_throughput']:.1f} tok/s, TTFT p99 {r['p99_ttft_ms'] or 0:.0f} ms, "
            f"TPOT median {r['median_tpot_ms'] or 0:.1f} ms, failed {r['failed']}")  # fmt: skip


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="shardserve bench report", description=__doc__.split("\n")[0])
    p.add_argument("--peers", default="all", help="all, none or a comma-separated subset of llama,vllm,naive")
    p.add_argument("--quick", action="store_true", help="16-stream workloads only, fewer requests")
    p.add_argument("--model", type=Path, default=None, help="the GGUF every system serves (default model)")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--charts", type=Path, default=ROOT / "docs" / "bench", help="folder for the PNG charts")
    p.add_argument("--bandwidth-gbs", type=float, default=DEFAULT_BANDWIDTH_GBS)
    p.add_argument("--no-setup", action="store_true", help="skip peers not set up instead of setting them up")
    p.add_argument("--rerun", default=None, help="comma-separated systems (e.g. vLLM) to run again after a fix; "
                   "every other row comes from the last run's results/summary.json")  # fmt: skip
    a = p.parse_args(argv)
    print(FULL_RUN_WARNING if not a.quick else "make bench QUICK=1: the 16-stream workloads only", flush=True)
    t0 = time.monotonic()
    root = bench_dir()
    model = a.model or servers.default_model_file()
    peers = parse_peers(a.peers)
    setup_failed = {} if a.no_setup else setup(peers, model, root)
    names = {"llama": "llama.cpp", "vllm": "vLLM", "naive": "naive"}
    ready = [names[p] for p in peers if is_set_up(p, root)]
    skipped = {
        names[p]: setup_failed.get(p, "not set up (--no-setup)") for p in peers if names[p] not in ready
    }
    systems = ["shardserve", *ready] + ([] if a.quick else [v[0] for v in VARIANTS])
    workloads = plan(a.quick)
    results: list[dict] = []
    reran = [s.strip() for s in a.rerun.split(",")] if a.rerun else []
    if reran:
        results = [
            r for r in json.loads((root / "results" / "summary.json").read_text()) if r["system"] not in reran
        ]
        systems = [s for s in systems if s in reran]
    for system in systems:
        run_system(system, workloads, model, root, results)
    (root / "results" / "summary.json").write_text(json.dumps(results, indent=1))
    charts = write_charts(results, a.charts)
    extra = {name: (root / "results" / f"{name}.md") for name in ("kernels", "engine", "structured")}
    section = render(
        results, workloads, roofline(model, a.bandwidth_gbs), a.bandwidth_gbs, servers.versions(root), skipped,
        charts, a.out.parent, {k: _dated(v) for k, v in extra.items() if v.exists()}, a.quick,
        time.monotonic() - t0, reran,
    )  # fmt: skip
    write_section(a.out, section)
    print(f"\nwrote {a.out} (between the bench markers) and {len(charts)} charts in {a.charts}")
    return 1 if any("error" in r or r["result"]["failed"] for r in results) else 0


def _dated(path: Path) -> str:
    """A results file of an earlier step, with when it was written: a --rerun reuses older ones."""
    when = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"Written {when} by `make bench`'s step of that name.\n\n" + path.read_text()
