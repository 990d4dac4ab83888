"""The benchmark suite: every scenario of docs/DESIGN.md §7 beside a naive baseline, in one run.

``broadcast-server bench [scenario …] [--smoke] [--repeat R]`` (or ``make bench``) runs the named scenarios
(all when none is named), prints one table (ours, baseline, ratio, a peer server's figure where measured, the
§7 target and whether it is met),
writes ``bench/results/<date>.json`` and a PNG per scenario beside it. It asserts nothing.

A scenario is a function ``run(ctx: Context) -> Outcome`` in its own module (``SCENARIOS`` maps names to
``module:function``; imported only when run). The load generator always runs in other processes than the
servers; both share this machine, which the output says.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

RESULTS = Path(__file__).parent / "results"
PACKAGES = ("starlette", "sse-starlette", "uvicorn", "uvloop", "aiokafka", "SQLAlchemy", "asyncpg", "redis", "orjson")
ROOT = Path(__file__).resolve().parent.parent

SCENARIOS: dict[str, str] = {  # name -> module:function, in the order of the issue
    "idle": "bench.scenarios.connections:idle",
    "fanout": "bench.scenarios.connections:fanout",
    "targeted": "bench.scenarios.publishing:targeted",
    "targeted-sustained": "bench.scenarios.sustained:targeted_sustained",
    "publish-api": "bench.scenarios.publishing:publish_api",
    "bulk": "bench.scenarios.bulk:bulk",
    "urgent-under-bulk": "bench.scenarios.urgent:urgent_under_bulk",
    "reconnect": "bench.scenarios.reconnect:reconnect",
    "consumer": "bench.scenarios.consumer:consumer",
    "churn": "bench.scenarios.churn:churn",
    "burst": "bench.scenarios.burst:burst",
}


@dataclass
class Measure:
    """One figure, ours beside the baseline's (and a peer's: Centrifugo's, where measured), with the §7 target
    it answers to (same unit), if any."""

    metric: str
    unit: str
    ours: float
    baseline: float | None
    better: Literal["lower", "higher"] = "lower"
    must: float | None = None
    goal: float | None = None
    note: str = ""
    limit: float | None = None  # the raw libraries doing the same work in the same run, where measured
    peer: float | None = None  # the peer server (bench/peers: Centrifugo) doing the same work, same unit

    @property
    def of_peer(self) -> float | None:
        """ours / peer (NaN-safe); below 1 is better when lower is better."""
        if self.peer is None or not _finite(self.ours) or not _finite(self.peer) or self.peer == 0:
            return None
        return self.ours / self.peer

    @property
    def of_limit(self) -> float | None:
        """ours / limit (NaN-safe): the share of what the libraries alone reach."""
        if self.limit is None or not _finite(self.ours) or not _finite(self.limit) or self.limit == 0:
            return None
        return self.ours / self.limit

    @property
    def ratio(self) -> float | None:
        """ours / baseline (NaN-safe); below 1 is better when lower is better."""
        if self.baseline is None or not _finite(self.ours) or not _finite(self.baseline) or self.baseline == 0:
            return None
        return self.ours / self.baseline

    def _meets(self, target: float) -> bool:
        return self.ours <= target if self.better == "lower" else self.ours >= target

    def verdict(self) -> str:
        """'goal', 'met', 'MISSED by x%' or '' when §7 sets no target."""
        if self.must is None or not _finite(self.ours):
            return "" if self.must is None else "no value"
        if self.goal is not None and self._meets(self.goal):
            return "goal"
        if self._meets(self.must):
            return "met"
        off = abs(self.ours - self.must) / self.must * 100 if self.must else float("inf")
        return f"MISSED by {off:.0f}%"


@dataclass
class Series:
    """One line of a scenario's plot."""

    label: str
    x: list[float]
    y: list[float]


@dataclass
class Outcome:
    scenario: str
    title: str
    measures: list[Measure]
    series: list[Series] = field(default_factory=list)  # plotted as lines when present, else bars
    x_label: str = ""
    y_label: str = ""
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # raw runs, JSON-serialisable
    seconds: float = 0.0


@dataclass
class Context:
    smoke: bool
    repeat: int
    scratch: Path
    _stack: Any = None
    names: set[str] = field(default_factory=set)  # unique names whose topics are still on the stack

    def stack(self) -> Any:
        """The real stack (3 KRaft brokers, PostgreSQL, Redis), started on first use; a ``StackInfo``."""
        if self._stack is None:
            from devstack import stack

            self._stack = stack.up()
        return self._stack

    def tidy(self) -> None:
        """Delete the topics of the unique names handed out so far (``devstack.topics``): each scenario
        starts on a cluster as small as the first one did."""
        if self._stack is not None and self.names:
            import asyncio

            from devstack.topics import delete_scratch_topics

            asyncio.run(delete_scratch_topics(self._stack.kafka_bootstrap, self.names))
            self.names.clear()


def median(values: Sequence[float]) -> float:
    finite = [v for v in values if _finite(v)]
    return statistics.median(finite) if finite else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1); NaN for no values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] if ordered else float("nan")


def _finite(value: float | None) -> bool:
    return value is not None and not math.isnan(value) and not math.isinf(value)


def machine() -> dict[str, Any]:
    mem_kb = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    versions: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
        "fd_hard_limit": _fd_limit(),
        "load_average_at_start": os.getloadavg(),
        "pinning": "none: servers, load generators and the stack share all cores",
        "kafka": "3 combined KRaft nodes (4.1) on 127.0.0.1, replication 3, acks=all",
        "commit": _git("rev-parse", "--short", "HEAD"),
    }


def _fd_limit() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None or not _finite(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f} %"


COLUMNS = (
    "scenario",
    "measure",
    "unit",
    "ours",
    "baseline",
    "ours/base",
    "peer",
    "ours/peer",
    "limit",
    "ours/limit",
    "§7 must",
    "§7 goal",
    "verdict",
)


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _cells(m: Measure) -> tuple[str, ...]:
    """A measure's cells after the scenario's, in the order of ``COLUMNS``; an absent figure is '-'."""
    return (
        m.metric,
        m.unit,
        _fmt(m.ours),
        _fmt(m.baseline),
        _times(m.ratio),
        _fmt(m.peer),
        _times(m.of_peer),
        _fmt(m.limit),
        _share(m.of_limit),
        _fmt(m.must),
        _fmt(m.goal),
        m.verdict(),
    )


def table(outcomes: Sequence[Outcome]) -> str:
    rows: list[tuple[str, ...]] = [COLUMNS]
    for outcome in outcomes:
        for m in outcome.measures:
            rows.append((outcome.scenario, *_cells(m)))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [
            str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(outcomes: Sequence[Outcome], info: dict[str, Any]) -> str:
    out = [
        f"# Benchmark results {info['date']}",
        "",
        f"Machine: {info['machine']['cpus']} cores ({info['machine']['cpu_model']}), "
        f"{info['machine']['memory_gib']} GiB, Python {info['machine']['python']}, kernel "
        f"{info['machine']['kernel']}; commit {info['machine']['commit']}. {info['machine']['pinning']}. "
        f"Command: `{info['command']}`.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|---|---|" + "---:|" * (len(COLUMNS) - 4) + "---|",
    ]
    for outcome in outcomes:
        for m in outcome.measures:
            out.append("| " + " | ".join((outcome.scenario, *_cells(m))) + " |")
    out.append("")
    for outcome in outcomes:
        out.append(f"## {outcome.scenario}: {outcome.title}")
        out.append("")
        out.append(f"![{outcome.scenario}]({info['date']}-{outcome.scenario}.png)")
        out += [f"- {note}" for note in outcome.notes]
        out.append("")
    return "\n".join(out)


def plot(outcome: Outcome, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if outcome.series:
        for s in outcome.series:
            ax.plot(s.x, s.y, marker="o", label=s.label)
        ax.set_xlabel(outcome.x_label)
        ax.set_ylabel(outcome.y_label)
        ax.legend()
        ax.grid(True, alpha=0.3)
    else:  # bars per measure, normalised to the baseline (or ours when there is none), the peer's when measured
        names = [f"{m.metric}\n({m.unit})" for m in outcome.measures]
        ours = [1.0 if m.ratio is None else m.ratio for m in outcome.measures]
        peers = [_peer_over_base(m) for m in outcome.measures]
        width = 0.27 if any(peers) else 0.4
        at = [-width, 0.0, width] if any(peers) else [-0.2, 0.2]  # bar offsets, centred on the tick
        ax.bar([i + at[0] for i in range(len(names))], ours, width=width, label="ours / baseline")
        ax.bar([i + at[1] for i in range(len(names))], [1.0] * len(names), width=width, label="baseline = 1")
        if any(peers):
            ax.bar([i + at[2] for i in range(len(names))], peers, width=width, label="peer / baseline")
        ax.set_xticks(range(len(names)), names, fontsize=7)
        ax.set_ylabel("ratio to the baseline")
        ax.legend()
    ax.set_title(f"{outcome.scenario}: {outcome.title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _peer_over_base(m: Measure) -> float:
    """peer / baseline for the bar plot; 0 (no bar) when either is missing."""
    if m.peer is None or m.baseline is None or not _finite(m.peer) or not _finite(m.baseline) or m.baseline == 0:
        return 0.0
    return m.peer / m.baseline


def outcome_from(data: dict[str, Any]) -> Outcome:
    """An ``Outcome`` read back from a results file."""
    fields = {**data, "measures": [Measure(**m) for m in data["measures"]]}
    fields["series"] = [Series(**line) for line in data["series"]]
    return Outcome(**fields)


def _merged(
    path: Path, fresh: list[Outcome], failures: dict[str, str], info: dict[str, Any]
) -> tuple[list[Outcome], dict[str, str]]:
    """The day's earlier outcomes with ``fresh`` in their place, in the suite's order; the commands noted."""
    if not path.exists():
        return fresh, failures
    earlier = json.loads(path.read_text())
    by_name = {o["scenario"]: outcome_from(o) for o in earlier["outcomes"]}
    by_name.update({o.scenario: o for o in fresh})
    for outcome in fresh:
        outcome.notes.append(f"re-run on its own: `{info['command']}`")
    kept_failures = {k: v for k, v in earlier.get("failures", {}).items() if k not in by_name} | failures
    info["command"] = f"{earlier['command']}; then {info['command']}"
    return [by_name[name] for name in SCENARIOS if name in by_name], kept_failures


def _load(name: str) -> Callable[[Context], Outcome]:
    module, function = SCENARIOS[name].split(":")
    scenario: Callable[[Context], Outcome] = getattr(importlib.import_module(module), function)
    return scenario


def _raise_fd_limit() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by every process started here


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="broadcast-server bench", description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", help=f"of {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and short windows: keeps the code alive")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (medians reported)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON, Markdown and PNGs go")
    parser.add_argument(
        "--merge", action="store_true", help="keep the other scenarios of the day's results; replace the ones run"
    )
    args = parser.parse_args(argv)
    names = args.scenarios or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    _raise_fd_limit()
    date = f"{datetime.now(UTC):%Y-%m-%d}" + ("-smoke" if args.smoke else "")
    info = {
        "date": date,
        "command": " ".join(["broadcast-server bench", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "load_generator": "separate processes on this same machine (not pinned)",
    }
    print(f"machine: {json.dumps(info['machine'])}")
    print("the load generators run in their own processes on this same machine; nothing is pinned")
    outcomes: list[Outcome] = []
    failures: dict[str, str] = {}
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        ctx = Context(smoke=args.smoke, repeat=1 if args.smoke else args.repeat, scratch=Path(tmp))
        for name in names:
            print(f"\n== {name} ({datetime.now(UTC):%H:%M:%S})", flush=True)
            started = time.monotonic()
            try:
                outcome = _load(name)(ctx)
            except Exception as exc:  # a broken scenario is reported and the others still run
                traceback.print_exc()
                failures[name] = repr(exc)
                continue
            finally:
                ctx.tidy()
            outcome.seconds = time.monotonic() - started
            outcomes.append(outcome)
            plot(outcome, args.out / f"{date}-{name}.png")
            print(table([outcome]), flush=True)
    print(
        f"\nall scenarios ({'smoke' if args.smoke else f'medians of {ctx.repeat}'}; ratios = ours/baseline, ours/peer)"
    )
    print(table(outcomes))
    for name, error in failures.items():
        print(f"FAILED scenario {name}: {error}")
    if args.merge:
        outcomes, failures = _merged(args.out / f"{date}.json", outcomes, failures, info)
    result = {**info, "outcomes": [asdict(o) for o in outcomes], "failures": failures}
    (args.out / f"{date}.json").write_text(json.dumps(result, indent=2, default=str))
    (args.out / f"{date}.md").write_text(markdown(outcomes, info))
    print(f"written {args.out / f'{date}.json'}, {date}.md and one PNG per scenario")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
