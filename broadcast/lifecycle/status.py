"""``broadcast-server status``: a terminal summary of running instances, from their own endpoints.

Each instance is asked for ``/health/ready`` and ``/metrics`` (standard library HTTP, no extra client):
readiness per check, SSE connections, outbox backlog and age, pending deliveries, dead letters by status,
consumer lag per group and deliveries by path. Exit status: 0 all ready, 1 one is not, 2 one is unreachable.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

TIMEOUT_S = 10.0


@dataclass
class Snapshot:
    """What one instance reported."""

    url: str
    ready: dict[str, object] = field(default_factory=dict)
    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=lambda: defaultdict(list))
    error: str | None = None

    def total(self, name: str, **match: str) -> float:
        return sum(v for labels, v in self.samples.get(name, ()) if all(labels.get(k) == w for k, w in match.items()))

    def by(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for labels, value in self.samples.get(name, ()):
            out[labels.get(label, "")] += value
        return dict(out)


def _get(url: str, token: str | None) -> tuple[int, bytes]:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {url!r}")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - the scheme is checked above
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as answer:  # noqa: S310 - checked above
            return int(answer.status), bytes(answer.read())
    except urllib.error.HTTPError as answer:  # 503 from readiness still carries its body
        return int(answer.code), bytes(answer.read())


def snapshot(url: str, token: str | None = None) -> Snapshot:
    base = url.rstrip("/")
    shot = Snapshot(base)
    try:
        _, body = _get(base + "/health/ready", None)
        shot.ready = json.loads(body)
        status, body = _get(base + "/metrics", token)
        if status != 200:
            shot.error = f"/metrics answered {status}"
            return shot
    except (OSError, ValueError) as exc:
        shot.error = f"unreachable: {exc}"
        return shot
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            shot.samples[sample.name].append((dict(sample.labels), float(sample.value)))
    return shot


def render(shot: Snapshot) -> list[str]:
    if shot.error is not None:
        return [f"{shot.url}: {shot.error}"]
    ready = shot.ready
    checks = ready.get("checks", {})
    assert isinstance(checks, dict)
    state = "READY" if ready.get("status") == "up" else "NOT READY"
    lines = [f"{shot.url} (instance {ready.get('instance', '?')}): {state}"]
    for name, verdict in sorted(checks.items()):
        lines.append(f"  {name:<10} {verdict}")
    lag = shot.by("broadcast_consumer_lag", "group")
    worst = {
        g: max((v for labels, v in shot.samples["broadcast_consumer_lag"] if labels.get("group") == g), default=0)
        for g in lag
    }
    letters = shot.by("broadcast_dlt_letters", "status")
    deliveries = shot.by("broadcast_deliveries_total", "path")
    lines += [
        f"  sse        {shot.total('broadcast_sse_connections'):.0f} connections, "
        f"{shot.total('broadcast_sse_users'):.0f} users",
        f"  outbox     {shot.total('broadcast_outbox_backlog'):.0f} unpublished, "
        f"oldest {shot.total('broadcast_outbox_oldest_age_seconds'):.0f} s",
        f"  pending    {shot.total('broadcast_pending_deliveries'):.0f} deliveries waiting for their users",
        "  dlt        " + (", ".join(f"{s} {n:.0f}" for s, n in sorted(letters.items())) or "none"),
        "  lag        "
        + (", ".join(f"{g} {n:.0f} (max partition {worst[g]:.0f})" for g, n in sorted(lag.items())) or "unknown"),
        "  delivered  " + (", ".join(f"{p} {n:.0f}" for p, n in sorted(deliveries.items())) or "none"),
    ]
    return lines


def run(urls: Sequence[str], token: str | None = None) -> int:
    shots = [snapshot(url, token) for url in urls]
    for shot in shots:
        print("\n".join(render(shot)))
    if any(s.error is not None for s in shots):
        return 2
    return 0 if all(s.ready.get("status") == "up" for s in shots) else 1
