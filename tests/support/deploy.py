"""Helpers of tests/deploy/test_deploy*.py: find the tools, read the metrics contract, read PromQL.

The contract is DESIGN.md's "Metrics" paragraph, parsed here rather than copied, so that a
dashboard or an alert naming a metric the server does not promise fails the tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# pinned: the newest schemas kubernetes-validate ships that the kubectl here (1.32) also speaks
K8S_VERSION = "1.32.0"
# labels Prometheus or the Prometheus Operator put on every scraped series
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "service", "endpoint", "container"})


def tool(name: str) -> str:
    """Path of a command-line tool from the venv or PATH; a loud skip when it cannot be had."""
    venv_bin = Path(sys.executable).parent
    found = shutil.which(name, path=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.skip(f"{name} is not installed: `make deploy-tools` installs it (this check did NOT run)")
    return found


def run(*cmd: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


@dataclass(frozen=True)
class Metric:
    labels: frozenset[str]
    histogram: bool


@dataclass(frozen=True)
class Contract:
    metrics: dict[str, Metric]  # without the shardserve_ prefix
    finish_reasons: frozenset[str]
    reject_reasons: frozenset[str]


def _design_md() -> Path:
    for path in (REPO / "DESIGN.md", REPO.parent / "shared" / "DESIGN.md"):
        if path.is_file():
            return path
    pytest.skip("DESIGN.md (the metrics contract) not found beside the repo: metric names NOT checked")


def _backticked(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


@cache
def contract() -> Contract:
    text = _design_md().read_text()
    para = next(line for line in text.splitlines() if line.startswith("Metrics (all prefixed `shardserve_`)"))
    # parentheses hold explanations and label values (`used`, `cached`, `free`), not metric names
    names_only = re.sub(r"\([^)]*\)", "", para)
    histograms = set(_backticked(re.search(r"histograms (.*?);", names_only).group(1)))
    metrics = {}
    for token in _backticked(names_only):
        m = re.fullmatch(r"([a-z][a-z0-9_]*)(?:\{([a-z_,]+)\})?", token)
        assert m, f"unexpected token {token!r} in DESIGN.md's Metrics paragraph"
        labels = frozenset(m.group(2).split(",")) if m.group(2) else frozenset()
        metrics[m.group(1)] = Metric(labels, m.group(1) in histograms)
    finish = re.search(r"`reason` of `requests_finished_total` is one of (.*?);", text)
    reject = re.search(r"`requests_rejected_total\{reason\}` is one of (.*?)\.", text)
    assert finish and reject, "DESIGN.md no longer lists the finish and reject reasons where expected"
    return Contract(metrics, frozenset(_backticked(finish.group(1))), frozenset(_backticked(reject.group(1))))


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, operator, value)


_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})


def promql_selectors(expr: str) -> tuple[list[Selector], set[str]]:
    """The metric selectors of a PromQL (or Grafana) expression, and the labels it groups by."""
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables: $instance, $__rate_interval
    # Grafana's label_values(metric, label) names a metric and a label, not two metrics
    expr = re.sub(r"label_values\((\w+)\s*,\s*\w+\)", r"\1", expr)
    grouping = {lbl.strip() for _, lbls in _GROUPING.findall(expr) for lbl in lbls.split(",") if lbl.strip()}
    expr = _GROUPING.sub(" ", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range durations
    selectors = []
    for m in re.finditer(r"(?<![\w.\"'])([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?(\s*\()?", expr):
        name, braces, call = m.groups()
        if call or name.lower() in _KEYWORDS:
            continue
        matchers = re.findall(r"(\w+)\s*(=~|!~|!=|=)\s*\"([^\"]*)\"", braces or "")
        selectors.append(Selector(name, tuple(matchers)))
    return selectors, grouping


def contract_problems(expr: str, allow: frozenset[str] = frozenset()) -> list[str]:
    """Why `expr` strays from the contract: unknown metrics, labels or reason values."""
    c = contract()
    problems = []
    selectors, grouping = promql_selectors(expr)
    allowed_grouping = set(TARGET_LABELS)
    for sel in selectors:
        if sel.metric in allow:
            allowed_grouping |= {lbl for lbl, _, _ in sel.matchers}
            continue
        if not sel.metric.startswith("shardserve_"):
            problems.append(f"{sel.metric}: not a shardserve_ metric")
            continue
        name = sel.metric.removeprefix("shardserve_")
        base, suffix = re.fullmatch(r"(.*?)(_bucket|_sum|_count)?", name).groups()
        metric = c.metrics.get(name)
        if metric is None and suffix and base in c.metrics and c.metrics[base].histogram:
            metric = c.metrics[base]
        if metric is None:
            problems.append(f"{sel.metric}: not in DESIGN.md's metrics contract")
            continue
        labels = metric.labels | TARGET_LABELS | ({"le"} if suffix == "_bucket" else set())
        allowed_grouping |= labels
        for label, op, value in sel.matchers:
            if label not in labels:
                problems.append(f"{sel.metric}: label {label!r} is not in the contract")
            if label == "reason" and op == "=":
                reasons = c.finish_reasons if name == "requests_finished_total" else c.reject_reasons
                if value not in reasons:
                    problems.append(f"{sel.metric}: reason {value!r} is not one the contract lists")
    problems += [f"groups by {lbl!r}, a label none of its metrics has" for lbl in grouping - allowed_grouping]
    if not selectors:
        problems.append(f"no metric found in {expr!r}")
    return problems


def k8s_expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command and args: `$$` is a literal `$`, unknown names stay."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, value)
