"""The user inbox in a real browser: live delivery, audiences, offline users, network cuts, read sync, removal.

Admin actions go through the API here (the console has its own tests); what is checked is what a user sees
in the page. Latencies are printed, not asserted (shared machines are noisy); waits are generous.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
from playwright.async_api import Page

from devstack.servers import Server
from tests.auth import bearer
from tests.browser.conftest import Browsers, screenshot

ADMIN = bearer("admin", "admin")
WAIT_MS = 15_000


async def post(server: Server, body: dict[str, Any]) -> str:
    async with httpx.AsyncClient(timeout=20) as http:
        response = await http.post(server.base + "/api/admin/broadcasts", json=body, headers=ADMIN)
    assert response.status_code == 201, response.text
    broadcast_id: str = response.json()["id"]
    return broadcast_id


async def put_roles(server: Server, user: str, roles: list[str]) -> None:
    async with httpx.AsyncClient(timeout=20) as http:
        response = await http.put(f"{server.base}/api/admin/users/{user}", json={"roles": roles}, headers=ADMIN)
    assert response.status_code == 200, response.text


async def open_inbox(browsers: Browsers, user: str) -> Page:
    page = await browsers.page(user)
    await page.locator("#connection", has_text="open").wait_for(timeout=WAIT_MS)
    return page


def message(page: Page, broadcast_id: str) -> Any:
    return page.locator(f'#messages li[data-id="{broadcast_id}"]')


async def shown_ids(page: Page) -> list[str]:
    ids: list[str] = await page.locator("#messages li").evaluate_all("(items) => items.map((i) => i.dataset.id)")
    return ids


def assert_clean(browsers: Browsers) -> None:
    """No uncaught exception, no CSP violation, no handler failure logged by the pages."""
    assert browsers.errors == [], browsers.errors


async def test_a_selected_broadcast_reaches_its_users_live_and_nobody_else(server: Server, browsers: Browsers) -> None:
    alice, bob, carol = [await open_inbox(browsers, u) for u in ("alice", "bob", "carol")]
    started = time.monotonic()
    sent = await post(
        server, {"content": "Deploy at 22:00 <b>not bold</b>", "targetType": "SELECTED", "targetIds": ["alice", "bob"]}
    )
    for page in (alice, bob):
        await message(page, sent).wait_for(timeout=WAIT_MS)
    print(f"SELECTED to 2 open inboxes: both shown {1000 * (time.monotonic() - started):.0f} ms after the POST")
    await carol.wait_for_timeout(1_500)
    assert await shown_ids(carol) == []
    content = message(alice, sent).locator(".content")
    assert await content.text_content() == "Deploy at 22:00 <b>not bold</b>", "rendered as text"
    assert await alice.locator("#messages b").count() == 0
    assert await alice.locator("#unread-count").text_content() == "1"
    await screenshot(alice, "inbox-alice")
    assert_clean(browsers)


async def test_all_reaches_every_tab_and_role_only_its_members(server: Server, browsers: Browsers) -> None:
    await put_roles(server, "dana", ["ops"])
    await put_roles(server, "erin", [])
    dana, erin, fay = [await open_inbox(browsers, u) for u in ("dana", "erin", "fay")]
    everyone = await post(server, {"content": "Hello everyone", "targetType": "ALL", "priority": "URGENT"})
    for page in (dana, erin, fay):
        await message(page, everyone).wait_for(timeout=WAIT_MS)
    await dana.locator("#urgent", has_text="Hello everyone").wait_for(timeout=WAIT_MS)
    ops = await post(server, {"content": "Ops only", "targetType": "ROLE", "targetIds": ["ops"], "category": "ops"})
    await message(dana, ops).wait_for(timeout=WAIT_MS)
    await erin.wait_for_timeout(1_500)
    assert await shown_ids(erin) == [everyone] and await shown_ids(fay) == [everyone]
    assert await shown_ids(dana) == [ops, everyone]
    await screenshot(dana, "inbox-urgent-and-role")
    assert_clean(browsers)


async def test_a_closed_tab_gets_the_message_once_when_it_opens(server: Server, browsers: Browsers) -> None:
    bob = await open_inbox(browsers, "bob")
    await bob.close()
    sent = await post(server, {"content": "while you were away", "targetType": "SELECTED", "targetIds": ["bob"]})
    bob = await open_inbox(browsers, "bob")
    await message(bob, sent).wait_for(timeout=WAIT_MS)
    await bob.wait_for_timeout(2_000)  # a reconciliation round must not add a second copy
    assert await shown_ids(bob) == [sent]
    assert_clean(browsers)


async def test_a_network_cut_loses_nothing_and_shows_nothing_twice(server: Server, browsers: Browsers) -> None:
    gina = await open_inbox(browsers, "gina")
    before = await post(server, {"content": "before the cut", "targetType": "SELECTED", "targetIds": ["gina"]})
    await message(gina, before).wait_for(timeout=WAIT_MS)
    context = await browsers.context("gina")
    await context.set_offline(True)
    await gina.locator("#connection", has_text="reconnecting").wait_for(timeout=WAIT_MS)
    during = [
        await post(server, {"content": f"during the cut {i}", "targetType": "SELECTED", "targetIds": ["gina"]})
        for i in range(3)
    ]
    everyone = await post(server, {"content": "to all during the cut", "targetType": "ALL"})
    await gina.wait_for_timeout(1_000)
    assert await shown_ids(gina) == [before], "nothing arrives while offline"
    await context.set_offline(False)
    for sent in [*during, everyone]:
        await message(gina, sent).wait_for(timeout=WAIT_MS)
    await gina.locator("#connection", has_text="open").wait_for(timeout=WAIT_MS)
    await gina.wait_for_timeout(2_000)
    shown = await shown_ids(gina)
    assert sorted(shown) == sorted([before, *during, everyone]) and len(shown) == len(set(shown)) == 5
    assert_clean(browsers)


async def test_read_in_one_tab_syncs_the_other_and_cancel_removes_the_message(
    server: Server, browsers: Browsers
) -> None:
    tab1, tab2 = await open_inbox(browsers, "hana"), await open_inbox(browsers, "hana")
    first = await post(server, {"content": "read me", "targetType": "SELECTED", "targetIds": ["hana"]})
    second = await post(server, {"content": "cancel me", "targetType": "SELECTED", "targetIds": ["hana"]})
    for page in (tab1, tab2):
        await message(page, second).wait_for(timeout=WAIT_MS)
        await message(page, first).wait_for(timeout=WAIT_MS)
        assert await page.locator("#unread-count").text_content() == "2"
    await message(tab1, first).locator("button.mark-read").click()
    await tab2.locator("#unread-count", has_text="1").wait_for(timeout=WAIT_MS)
    async with httpx.AsyncClient(timeout=20) as http:
        cancelled = await http.delete(f"{server.base}/api/admin/broadcasts/{second}", headers=ADMIN)
    assert cancelled.status_code == 200, cancelled.text
    for page in (tab1, tab2):
        await message(page, second).wait_for(state="detached", timeout=WAIT_MS)
        assert await shown_ids(page) == [first]
        assert await page.locator("#unread-count").text_content() == "0"
    assert_clean(browsers)


async def test_signing_out_in_one_tab_signs_out_the_others(server: Server, browsers: Browsers) -> None:
    tab1, tab2 = await open_inbox(browsers, "jo"), await open_inbox(browsers, "jo")
    await tab1.click("#signout")
    for page in (tab1, tab2):
        await page.locator("#signin").wait_for(timeout=WAIT_MS)
        assert await page.locator("#messages li").count() == 0
    assert_clean(browsers)


async def test_dev_sign_in_from_the_page(server: Server, browsers: Browsers) -> None:
    context = await browsers.browser.new_context(base_url=server.base)
    try:
        page = await context.new_page()
        await page.goto("/inbox")
        await page.locator("#dev-signin").wait_for(timeout=WAIT_MS)
        await page.fill("#dev-user", "ivan")
        await page.click("#dev-signin")
        await page.locator("#connection", has_text="open").wait_for(timeout=WAIT_MS)
        assert await page.locator("#whoami").text_content() == "ivan"
        sent = await post(server, {"content": "hi ivan", "targetType": "SELECTED", "targetIds": ["ivan"]})
        await message(page, sent).wait_for(timeout=WAIT_MS)
        await screenshot(page, "inbox-dev-signin")
    finally:
        await context.close()
