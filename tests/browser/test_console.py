"""The admin console in a real browser, with users' inboxes open beside it: create, cancel, and the DLT path
from an armed fault drill to a redrive that reaches the user."""

from __future__ import annotations

from playwright.async_api import Page

from devstack.servers import Server
from tests.browser.conftest import Browsers, screenshot
from tests.browser.test_inbox import WAIT_MS, assert_clean, message, open_inbox, shown_ids


async def open_console(browsers: Browsers) -> Page:
    console = await browsers.page("admin", "/admin", "admin")
    await console.locator("#create-form").wait_for(timeout=WAIT_MS)
    return console


async def create_in_console(console: Page, content: str, target: str, ids: str = "") -> str:
    await console.fill("#content", content)
    await console.select_option("#target-type", target)
    if ids:
        await console.fill("#target-ids", ids)
    await console.click("#create")
    row = console.locator("#broadcasts tr[data-id]", has_text=content).first
    await row.wait_for(timeout=WAIT_MS)
    broadcast_id = await row.get_attribute("data-id")
    assert broadcast_id
    return broadcast_id


async def test_a_broadcast_created_in_the_console_reaches_exactly_its_users(server: Server, browsers: Browsers) -> None:
    alice, bob, carol = [await open_inbox(browsers, u) for u in ("alice", "bob", "carol")]
    console = await open_console(browsers)
    sent = await create_in_console(console, "Maintenance at 22:00 <script>alert(1)</script>", "SELECTED", "alice, bob")
    for page in (alice, bob):
        await message(page, sent).wait_for(timeout=WAIT_MS)
    row = console.locator(f'#broadcasts tr[data-id="{sent}"]')
    await row.locator(".stats", has_text="2 / 2 /").wait_for(timeout=WAIT_MS)  # targeted 2, delivered 2
    await carol.wait_for_timeout(1_000)
    assert await shown_ids(carol) == []
    await screenshot(console, "console")
    assert_clean(browsers)


async def test_cancel_in_the_console_removes_the_message_from_open_inboxes(server: Server, browsers: Browsers) -> None:
    dana = await open_inbox(browsers, "dana")
    console = await open_console(browsers)
    sent = await create_in_console(console, "to be cancelled", "ALL")
    await message(dana, sent).wait_for(timeout=WAIT_MS)
    await console.locator(f'#broadcasts tr[data-id="{sent}"] button.cancel').click()
    await console.locator(f'#broadcasts tr[data-id="{sent}"] .status', has_text="CANCELLED").wait_for(timeout=WAIT_MS)
    await message(dana, sent).wait_for(state="detached", timeout=WAIT_MS)
    assert_clean(browsers)


async def test_a_drilled_broadcast_lands_in_the_dlt_panel_and_a_redrive_delivers_it(
    server: Server, browsers: Browsers
) -> None:
    """kim is offline while the drilled delivery fails (an online user would get the PENDING row from the
    reconciler anyway: the database, not the consumer, is the source of truth for what is owed)."""
    console = await open_console(browsers)
    await console.locator("#drill-arm").click()
    await console.locator("#drill-armed li").first.wait_for(timeout=WAIT_MS)
    sent = await create_in_console(console, "drilled message", "SELECTED", "kim")
    await console.fill("#dlt-broadcast", sent)
    await console.click("#dlt-refresh")
    letter = console.locator("#dlt-list tr[data-letter]").first
    await letter.wait_for(timeout=60_000)  # 3 attempts with backoff, then the DLT consumer stores it
    kim = await open_inbox(browsers, "kim")
    await kim.wait_for_timeout(1_500)
    assert await shown_ids(kim) == [], "a failed delivery is not shown"
    await letter.locator("button.dlt-detail").click()
    await console.locator("#dlt-detail", has_text="FaultDrillError").wait_for(timeout=WAIT_MS)
    await screenshot(console, "console-dlt")
    await letter.locator("button.dlt-redrive").click()
    await message(kim, sent).wait_for(timeout=WAIT_MS)
    await kim.wait_for_timeout(1_500)
    assert await shown_ids(kim) == [sent]
    assert_clean(browsers)
