"""How ``broadcast-client.js`` retries, in a real browser against a real server: it follows a refusal's
``Retry-After`` instead of asking again every few seconds, and its own delays grow, are capped and are spread
(the tabs of a restarted server must not come back in one wave)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.async_api import Response

from devstack.servers import Server, isolated_env
from devstack.stack import StackInfo
from tests.browser.conftest import Browsers
from tests.browser.test_inbox import WAIT_MS, message, open_inbox, post

TICKET = "/api/user/sse/ticket"
RATE = 0.1  # stream opens per second per user: after the first, the next is refused for ~10 s


@pytest.fixture
def env(stack: StackInfo, unique_name: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    yield isolated_env(
        stack,
        unique_name,
        tmp_path,
        BROADCAST_LIMITS__CONNECT_BURST_PER_USER="1",
        BROADCAST_LIMITS__CONNECT_PER_SECOND_PER_USER=str(RATE),
    )


async def test_a_refused_reconnect_waits_as_told_then_catches_up(server: Server, browsers: Browsers) -> None:
    """The tab reconnects at once when the network comes back, is refused (429, Retry-After ~9 s: its user
    is over the stream-open rate), waits that long and no less, asks once more, and gets what was sent."""
    tickets: list[tuple[float, int, str | None]] = []

    def seen(response: Response) -> None:
        if response.url.endswith(TICKET):
            tickets.append((time.monotonic(), response.status, response.headers.get("retry-after")))

    context = await browsers.context("ivy")
    context.on("response", seen)
    ivy = await open_inbox(browsers, "ivy")
    await context.set_offline(True)
    await ivy.locator("#connection", has_text="reconnecting").wait_for(timeout=WAIT_MS)
    during = await post(server, {"content": "while refused", "targetType": "SELECTED", "targetIds": ["ivy"]})
    await context.set_offline(False)
    await message(ivy, during).wait_for(timeout=30_000)
    await ivy.locator("#connection", has_text="open").wait_for(timeout=WAIT_MS)
    statuses = [status for _, status, _ in tickets]
    assert statuses == [201, 429, 201], f"ticket answers {statuses}: the refusal's Retry-After was not followed"
    (refused_at, _, retry_after), (asked_at, _, _) = tickets[1], tickets[2]
    assert retry_after is not None and int(retry_after) >= 5, retry_after
    waited = asked_at - refused_at
    print(f"[retry-after] refused with Retry-After {retry_after} s; asked again {waited:.2f} s later")
    assert waited >= int(retry_after) - 0.25, f"asked again after {waited:.2f} s, told {retry_after} s"


async def test_retry_delays_grow_are_capped_and_spread(server: Server, browsers: Browsers) -> None:
    """The client's own delays (no Retry-After): failure n waits half to all of 3 s * 2^n, at most 60 s; two clients
    failing together do not wait the same."""
    page = await open_inbox(browsers, "jay")
    delays: list[list[float]] = await page.evaluate(
        """() => Array.from({length: 40}, () => {
             const client = new BroadcastClient({});
             return Array.from({length: 8}, () => client._backoff());
           })"""
    )
    for n in range(8):
        ceiling = min(60_000, 3_000 * 2**n)
        column = [run[n] for run in delays]
        assert all(ceiling / 2 <= d <= ceiling for d in column), (n, ceiling, column)
        assert len({round(d) for d in column}) > 20, f"failure {n}: delays not spread: {column}"
