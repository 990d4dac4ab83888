"""Connection-rate buckets: a burst, a refill rate, and no memory of a bucket that has refilled."""

from __future__ import annotations

import pytest

from sse.admission import TokenBuckets


def test_a_burst_is_allowed_then_the_wait_is_until_the_next_token() -> None:
    buckets = TokenBuckets(burst=2, per_second=1.0)
    assert buckets.take("a", now=0.0) == 0
    assert buckets.take("a", now=0.0) == 0
    assert buckets.take("a", now=0.0) == 1.0, "empty: one token a second"
    assert buckets.take("a", now=0.5) == 0.5


def test_buckets_that_refilled_are_forgotten_and_those_still_refilling_are_kept() -> None:
    buckets = TokenBuckets(burst=2, per_second=1.0, max_keys=100_000)
    for i in range(50):
        buckets.take(f"gone-{i}", now=0.0)
    buckets.take("refilling", now=2.5)
    buckets.take("refilling", now=2.5)
    for k in range(30):
        buckets.take("busy", now=3.0 + k / 100)
    assert len(buckets) == 2, "the 50 one-off keys were full again by 1.0 and went; 'refilling' and 'busy' stay"
    assert buckets.take("refilling", now=3.3) == pytest.approx(0.2), "a bucket still refilling keeps its debt"


def test_a_forgotten_key_starts_full_as_a_new_one_does() -> None:
    buckets = TokenBuckets(burst=2, per_second=1.0)
    buckets.take("a", now=0.0)
    buckets.take("a", now=0.0)
    buckets.take("b", now=10.0)
    buckets.take("c", now=10.0)
    assert len(buckets) == 2, "'a' was full again by 2.0"
    assert [buckets.take("a", now=10.0) for _ in range(3)] == [0, 0, 1.0]
