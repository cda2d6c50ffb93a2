"""BENCHMARKS.md's generated section and the PNG charts, from `shardserve bench report`'s results.

A result row is {"system", "workload": Workload as a dict, "command", and "result" (bench serve's
figures) or "error"}. Only the text between the bench markers is ever replaced."""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
CONCURRENCY_WORKLOADS = ("c1", "c4", "c16", "c64")
# the weights each system reads per decode step, for its distance from the roofline
ROOFLINE_DTYPE = {"shardserve": "int8", "shardserve tp2": "int8", "shardserve bf16": "bf16", "llama.cpp": "file",
                  "vLLM": "fp32", "naive": "fp32"}  # fmt: skip


def _get(results: list[dict], system: str, workload: str, key: str) -> float | None:
    for r in results:
        if r["system"] == system and r["workload"]["name"] == workload and "result" in r:
            return r["result"].get(key)
    return None


def _f(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def machine() -> str:
    cpu, mem = "unknown CPU", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, IndexError, ValueError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}"


def _ratio_line(label: str, ours: float | None, theirs: float | None, target: float, aim: float | None,
                lower_is_better: bool = False, unit: str = "tok/s") -> str:  # fmt: skip
    if ours is None or theirs is None or not theirs or not ours:
        return f"- {label}: not measured in this run"
    r = ours / theirs
    met = r <= target if lower_is_better else r >= target
    cmp_ = "≤" if lower_is_better else "≥"
    goal = f"target {cmp_} {target}×" + (f", aim {aim}×" if aim else "")
    return f"- {label}: {ours:.1f} vs {theirs:.1f} {unit} = **{r:.2f}×** ({goal}): {'met' if met else '**MISSED**'}"


def targets(results: list[dict]) -> list[str]:
    tput = "output_throughput"
    lines = [
        _ratio_line("16 streams, shardserve ÷ llama.cpp throughput", _get(results, "shardserve", "c16", tput),
                    _get(results, "llama.cpp", "c16", tput), 1.2, 1.5),
        _ratio_line("64 streams, shardserve ÷ llama.cpp throughput", _get(results, "shardserve", "c64", tput),
                    _get(results, "llama.cpp", "c64", tput), 1.2, 1.5),
        _ratio_line("1 stream, shardserve ÷ llama.cpp median TPOT", _get(results, "shardserve", "c1", "median_tpot_ms"),
                    _get(results, "llama.cpp", "c1", "median_tpot_ms"), 1.5, 1.25, lower_is_better=True, unit="ms"),
        _ratio_line("16 streams, shardserve ÷ naive throughput", _get(results, "shardserve", "c16", tput),
                    _get(results, "naive", "c16", tput), 5.0, None),
        _ratio_line("1 stream, int8 (auto) ÷ bf16 median TPOT", _get(results, "shardserve", "c1", "median_tpot_ms"),
                    _get(results, "shardserve bf16", "c1", "median_tpot_ms"), 1.0, None, lower_is_better=True,
                    unit="ms"),
        _ratio_line("prefix workload, shardserve ÷ llama.cpp throughput", _get(results, "shardserve", "prefix", tput),
                    _get(results, "llama.cpp", "prefix", tput), 1.0, None),
        _ratio_line("512-token prompts, shardserve ÷ llama.cpp throughput", _get(results, "shardserve", "long", tput),
                    _get(results, "llama.cpp", "long", tput), 1.0, None),
        _ratio_line("16 streams, TP=2 ÷ TP=1 throughput", _get(results, "shardserve tp2", "c16", tput),
                    _get(results, "shardserve", "c16", tput), 0.9, None),
    ]  # fmt: skip
    for w in CONCURRENCY_WORKLOADS:
        lines.append(_ratio_line(f"{w[1:]} streams, shardserve ÷ vLLM throughput (ahead at every concurrency)",
                                 _get(results, "shardserve", w, tput), _get(results, "vLLM", w, tput), 1.0, None))  # fmt: skip
    return [x for x in lines if "not measured" not in x] or ["- no target could be computed from this run"]


def workload_table(results: list[dict], name: str) -> list[str]:
    rows = [r for r in results if r["workload"]["name"] == name]
    ours = _get(results, "shardserve", name, "output_throughput")
    out = ["| system | ok / failed | output tok/s | req/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p50 ms | "
           "E2EL p50 ms | shardserve ÷ system |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        if "error" in row:
            out.append(f"| {row['system']} | failed: {row['error'][:120]} |" + " |" * 7)
            continue
        r = row["result"]
        ratio = f"{ours / r['output_throughput']:.2f}×" if ours and r["output_throughput"] else "–"
        out.append(
            f"| {row['system']} | {r['completed']} / {r['failed']} | {_f(r['output_throughput'])} | "
            f"{_f(r['request_throughput'], 2)} | {_f(r['median_ttft_ms'], 0)} / {_f(r['p99_ttft_ms'], 0)} | "
            f"{_f(r['median_tpot_ms'])} / {_f(r['p99_tpot_ms'])} | {_f(r['median_itl_ms'])} | "
            f"{_f(r['median_e2el_ms'], 0)} | {ratio} |"
        )
    return out


def _systems(results: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["system"] for r in results))


def write_charts(results: list[dict], out_dir: Path) -> list[Path]:
    """Output throughput and TTFT p99 against concurrency, one line per system."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, title, fname in (("output_throughput", "output tokens/s", "throughput.png"),
                              ("p99_ttft_ms", "TTFT p99 (ms)", "ttft_p99.png")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(6, 4))
        for system in _systems(results):
            pts = [
                (int(w[1:]), v)
                for w in CONCURRENCY_WORKLOADS
                if (v := _get(results, system, w, key)) is not None
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=system)
        ax.set_xscale("log", base=2)
        ticks = [int(w[1:]) for w in CONCURRENCY_WORKLOADS]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrent streams (128 prompt + 128 output tokens)")
        ax.set_ylabel(title)
        ax.set_title(f"{title} vs concurrency, one run")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=100)
        plt.close(fig)
        paths.append(out_dir / fname)
    return paths


def _demote(md: str) -> str:
    """Another bench's markdown, its headings pushed two levels down to sit under ours."""
    return "\n".join("##" + line if line.startswith("#") else line for line in md.strip().splitlines())


def render(results: list[dict], workloads: Sequence[Any], roof: list[dict], bandwidth: float,
           versions: dict[str, str], skipped: dict[str, str], charts: list[Path], doc_dir: Path,
           extra_md: dict[str, str], quick: bool, elapsed_s: float, reran: Sequence[str] = ()) -> str:  # fmt: skip
    today = datetime.date.today().isoformat()
    kind = "`make bench QUICK=1` (16 streams only, fewer requests)" if quick else "`make bench`"
    md = [f"## Side by side: generated by {kind} on {today}", "",
          f"Machine: {machine()}. The run took {elapsed_s / 60:.0f} min. Every figure in this section comes "
          "from this one run, one system after another: compare within it, not with other runs.", "",
          "| system | version |", "|---|---|", *(f"| {k} | {v} |" for k, v in versions.items()), ""]  # fmt: skip
    md += [f"Not measured: {name} ({why[:200]}).\n" for name, why in skipped.items()]
    if reran:
        md += [f"Measured again after the run, in a second invocation (`--rerun`): {', '.join(reran)}; "
               f"the time above is that invocation's.\n"]  # fmt: skip
    md += ["### Targets", "", *targets(results), "", "### Output throughput vs concurrency (tok/s)", ""]
    conc = [w.name for w in workloads if w.name in CONCURRENCY_WORKLOADS]
    md += [
        "| system | " + " | ".join(_streams(int(w[1:])) for w in conc) + " |",
        "|---" * (len(conc) + 1) + "|",
    ]
    for system in _systems(results):
        md.append(
            f"| {system} | "
            + " | ".join(_f(_get(results, system, w, "output_throughput")) for w in conc)
            + " |"
        )
    md += ["", *(f"![{p.stem}]({os.path.relpath(p, doc_dir)})" for p in charts), ""]
    for w in workloads:
        desc = f"{_streams(w.concurrency)}, {w.num_prompts} requests, {w.input_len} prompt tokens" + (
            f" after a shared {w.prefix_len}-token prefix" if w.prefix_len else "") + f", {w.output_len} output tokens"  # fmt: skip
        md += [f"### Workload {w.name}: {desc}", "", *workload_table(results, w.name), ""]
    md += ["### Roofline", "", f"Weights read per decode step over {bandwidth:g} GB/s give the batch-1 floor "
           "(app/bench/roofline.py); `file` is the GGUF's own encoding, what llama.cpp reads.", "",
           "| dtype | MB per step | floor ms | max tok/s at batch 1 |", "|---|---|---|---|"]  # fmt: skip
    md += [
        f"| {r['dtype']} | {r['bytes'] / 1e6:.0f} | {r['floor_ms']:.1f} | {r['max_tok_s']:.0f} |"
        for r in roof
    ]
    md.append("")
    floors = {r["dtype"]: r["floor_ms"] for r in roof}
    for system in _systems(results):
        tpot = _get(results, system, "c1", "median_tpot_ms")
        dtype = ROOFLINE_DTYPE.get(system)
        if tpot and dtype in floors:
            md.append(
                f"- {system}: median TPOT alone {tpot:.1f} ms = {tpot / floors[dtype]:.1f}× its {dtype} floor"
            )
    md += ["", "### Commands", "", "Load: `shardserve bench serve --base-url URL --num-prompts N --max-concurrency C "
           "--input-len I --output-len 128 --ignore-eos [--prefix-len P]`; servers:", ""]  # fmt: skip
    md += [
        f"- {s}: `{cmd}`" for s, cmd in dict.fromkeys((r["system"], _short(r["command"])) for r in results)
    ]
    for name, text in extra_md.items():
        md += ["", f"### {name} (`shardserve bench {name}`)", "", _demote(text)]
    return "\n".join(md).rstrip() + "\n"


def _streams(n: int) -> str:
    return f"{n} stream" + "s" * (n != 1)


def _short(cmd: str) -> str:
    """Commands without this machine's absolute paths."""
    root = str(Path(__file__).resolve().parents[2]) + "/"
    home = str(Path.home())
    return cmd.replace(root, "").replace(home, "~")


def write_section(path: Path, section: str) -> None:
    """Replace what lies between the markers (appending them if absent); the rest stays as written."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{section}{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
