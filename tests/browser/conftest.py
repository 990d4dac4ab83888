"""Browser tests: Debian's Chromium driven by Playwright against real server processes on the real stack.

Chromium is installed from Debian when missing (like the stack's other packages). Every user is a browser
context of their own (its own localStorage, so its own sign-in); screenshots go to ``artifacts/``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from devstack.servers import Server, isolated_env
from devstack.stack import StackInfo
from devstack.tools import require
from tests.auth import token
from tests.servers import fast_retries, server, server_factory

__all__ = ["server", "server_factory"]

NETWORK_NOISE = ("Failed to load resource", "net::ERR_", "EventSource")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"


def chromium_path() -> str:
    return require("chromium")


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    executable = chromium_path()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=executable, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
def env(stack: StackInfo, unique_name: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    yield isolated_env(
        stack,
        unique_name,
        tmp_path,
        BROADCAST_TESTING__FAULT_DRILL_ENABLED="true",
        **fast_retries(3, max_backoff_s=10.0),  # a drilled record reaches the DLT fast
    )


class Browsers:
    """Opens pages signed in as a user (a context per user) and records browser-side errors."""

    def __init__(self, browser: Browser, base: str) -> None:
        self.browser, self.base = browser, base
        self.contexts: dict[str, BrowserContext] = {}
        self.errors: list[str] = []

    async def context(self, user: str, *roles: str) -> BrowserContext:
        if user not in self.contexts:
            context = await self.browser.new_context(base_url=self.base, viewport={"width": 1280, "height": 900})
            signed = token(user, *roles)
            store = f"localStorage.setItem('broadcast.token', {signed!r});"
            await context.add_init_script(store + f"localStorage.setItem('broadcast.user', {user!r});")
            self.contexts[user] = context
        return self.contexts[user]

    async def page(self, user: str, path: str = "/inbox", *roles: str) -> Page:
        page = await (await self.context(user, *roles)).new_page()
        page.on("console", lambda m: self._console(user, m.type, m.text))
        page.on("pageerror", lambda e: self.errors.append(f"{user}: uncaught {e}"))
        await page.goto(path)
        return page

    def _console(self, user: str, kind: str, text: str) -> None:
        """Console errors, except the network's own (a stream cut on purpose, an offline tab)."""
        if kind == "error" and not any(n in text for n in NETWORK_NOISE):
            self.errors.append(f"{user}: console {text}")

    async def close(self) -> None:
        for context in self.contexts.values():
            await context.close()


@pytest.fixture
async def browsers(browser: Browser, server: Server) -> AsyncIterator[Browsers]:
    opened = Browsers(browser, server.base)
    try:
        yield opened
    finally:
        await opened.close()


async def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path
