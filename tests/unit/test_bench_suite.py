"""The benchmark suite's reporting: verdicts against DESIGN §7, ratios, the table, the files it writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import suite
from bench.suite import Context, Measure, Outcome, Series


@pytest.mark.parametrize(
    ("ours", "better", "verdict"),
    [
        (40.0, "lower", "goal"),
        (120.0, "lower", "met"),
        (375.0, "lower", "MISSED by 50%"),
        (60_000.0, "higher", "goal"),
        (12_000.0, "higher", "met"),
        (5_000.0, "higher", "MISSED by 50%"),
    ],
)
def test_a_measure_says_whether_it_meets_the_must_or_the_goal(ours: float, better: str, verdict: str) -> None:
    must, goal = (250.0, 50.0) if better == "lower" else (10_000.0, 50_000.0)
    measure = Measure("m", "ms", ours, None, better, must, goal)  # type: ignore[arg-type]
    assert measure.verdict() == verdict


def test_ratios_are_ours_over_the_baseline_and_absent_without_one() -> None:
    assert Measure("p99", "ms", 30.0, 120.0).ratio == 0.25
    assert Measure("p99", "ms", 30.0, None).ratio is None
    assert Measure("p99", "ms", float("nan"), 120.0).ratio is None
    assert Measure("p99", "ms", 30.0, 0.0).ratio is None
    assert Measure("untargeted", "ms", 30.0, 10.0).verdict() == ""


def test_the_peer_ratio_is_ours_over_the_peer_and_absent_without_one() -> None:
    assert Measure("p99", "ms", 30.0, 120.0, peer=20.0).of_peer == 1.5
    assert Measure("p99", "ms", 30.0, 120.0).of_peer is None
    assert Measure("p99", "ms", 30.0, None, peer=float("nan")).of_peer is None
    assert Measure("p99", "ms", 30.0, None, peer=0.0).of_peer is None


def test_the_table_shows_the_peer_beside_the_baseline_and_an_empty_cell_without_one() -> None:
    with_peer = Outcome("burst", "t", [Measure("p99", "ms", 30.0, 120.0, must=1000, peer=20.0)])
    without = Outcome("idle", "t", [Measure("rss", "KB", 12.0, 40.0)])
    header, _, first, second = suite.table([with_peer, without]).splitlines()
    assert header.split() == [
        "scenario", "measure", "unit", "ours", "baseline", "ours/base", "peer", "ours/peer", "limit",
        "ours/limit", "§7", "must", "§7", "goal", "verdict",
    ]  # fmt: skip
    assert first.split() == [
        "burst",
        "p99",
        "ms",
        "30.0",
        "120.0",
        "0.25x",
        "20.0",
        "1.50x",
        "-",
        "-",
        "1,000",
        "-",
        "met",
    ]
    assert second.split()[6:8] == ["-", "-"]


def test_results_written_before_the_peer_column_read_back_without_a_peer() -> None:
    old = {"metric": "p99", "unit": "ms", "ours": 30.0, "baseline": 120.0, "better": "lower", "must": None}
    data = {"scenario": "idle", "title": "t", "measures": [old], "series": []}
    assert suite.outcome_from(data).measures[0].peer is None


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (suite.percentile(values, 0.5), suite.percentile(values, 0.99), suite.percentile(values, 1.0)) == (
        50.0,
        99.0,
        100.0,
    )
    assert suite.percentile([], 0.5) != suite.percentile([], 0.5)  # NaN
    assert suite.median([1.0, float("nan"), 3.0]) == 2.0


def test_a_run_writes_the_table_json_markdown_and_a_plot_per_scenario(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def lines(ctx: Context) -> Outcome:
        assert ctx.smoke and ctx.repeat == 1
        return Outcome(
            "demo",
            "a demonstration",
            [Measure("p99", "ms", 30.0, 120.0, must=250, goal=50)],
            [Series("ours", [1, 2], [3, 4]), Series("baseline", [1, 2], [5, 6])],
        )

    def bars(ctx: Context) -> Outcome:
        return Outcome("bars", "no series", [Measure("rate", "1/s", 2.0, 1.0, "higher", limit=8.0, peer=4.0)])

    def broken(ctx: Context) -> Outcome:
        raise RuntimeError("boom")

    scenarios = {"demo": lines, "bars": bars, "broken": broken}
    monkeypatch.setattr(suite, "SCENARIOS", dict.fromkeys(scenarios, "x:y"))
    monkeypatch.setattr(suite, "_load", lambda name: scenarios[name])
    code = suite.main(["--smoke", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 1 and "FAILED scenario broken: RuntimeError('boom')" in printed
    assert "0.25x" in printed and "goal" in printed and "2.00x" in printed and "25.0 %" in printed
    assert "ours/peer" in printed and "0.50x" in printed
    [result] = list(tmp_path.glob("*.json"))
    data = json.loads(result.read_text())
    assert [o["scenario"] for o in data["outcomes"]] == ["demo", "bars"] and data["failures"] == {
        "broken": "RuntimeError('boom')"
    }
    assert data["machine"]["cpus"] >= 1 and data["machine"]["python"].startswith("3.")
    assert sorted(p.name.split("-smoke-")[1] for p in tmp_path.glob("*.png")) == ["bars.png", "demo.png"]
    written = next(tmp_path.glob("*.md")).read_text()
    assert "| ours | baseline | ours/base | peer | ours/peer | limit | ours/limit | §7 must |" in written
    assert "| demo | p99 | ms | 30.0 | 120.0 | 0.25x | - | - | - | - | 250.0 | 50.0 | goal |" in written
    assert "| bars | rate | 1/s | 2.00 | 1.00 | 2.00x | 4.00 | 0.50x | 8.00 | 25.0 % | - | - |  |" in written


def test_a_merged_rerun_replaces_its_scenario_and_keeps_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def first(ctx: Context) -> Outcome:
        return Outcome("first", "kept", [Measure("p99", "ms", 30.0, 120.0)], [Series("ours", [1], [2])])

    def flaky(ctx: Context) -> Outcome:
        raise RuntimeError("timed out")

    def fixed(ctx: Context) -> Outcome:
        return Outcome("second", "re-run", [Measure("rate", "1/s", 2.0, 1.0, "higher")])

    scenarios: dict[str, Any] = {"first": first, "second": flaky}
    monkeypatch.setattr(suite, "SCENARIOS", dict.fromkeys(scenarios, "x:y"))
    monkeypatch.setattr(suite, "_load", lambda name: scenarios[name])
    assert suite.main(["--smoke", "--out", str(tmp_path)]) == 1
    scenarios["second"] = fixed
    assert suite.main(["second", "--smoke", "--merge", "--out", str(tmp_path)]) == 0
    [result] = list(tmp_path.glob("*.json"))
    data = json.loads(result.read_text())
    assert [o["scenario"] for o in data["outcomes"]] == ["first", "second"] and data["failures"] == {}
    assert data["outcomes"][0]["measures"][0]["ours"] == 30.0 and "re-run" in data["outcomes"][1]["notes"][-1]
    assert "; then " in data["command"] and "| second | rate |" in next(tmp_path.glob("*.md")).read_text()
