"""The benchmark suite, in its smoke form, on the real stack: every scenario runs, ours and the baseline
each produce figures, and the report files are written. It keeps ``bench/`` from rotting; the figures are
not judged (a shared CI machine's timings mean nothing)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from bench.suite import SCENARIOS
from devstack.stack import StackInfo

ROOT = Path(__file__).resolve().parents[2]


def test_every_scenario_runs_in_smoke_form_and_reports_ours_beside_the_baseline(
    stack: StackInfo, tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "broadcast", "bench", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1_200,
    )
    print(done.stdout[-6000:])
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    [report] = list(tmp_path.glob("*.json"))
    data = json.loads(report.read_text())
    assert data["failures"] == {}
    assert [o["scenario"] for o in data["outcomes"]] == list(SCENARIOS)
    for outcome in data["outcomes"]:
        pairs = [(m["ours"], m["baseline"]) for m in outcome["measures"]]
        assert any(
            math.isfinite(ours) and baseline is not None and math.isfinite(baseline) for ours, baseline in pairs
        ), (outcome["scenario"], pairs)
        assert (tmp_path / f"{data['date']}-{outcome['scenario']}.png").stat().st_size > 1_000
    assert "| scenario | measure |" in (tmp_path / f"{data['date']}.md").read_text()
    assert data["machine"]["cpus"] >= 1 and data["machine"]["packages"]["aiokafka"]
