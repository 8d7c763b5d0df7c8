"""The web page at / in headless Chromium (Debian's, driven by Playwright),
against real servers on one store, and without JavaScript."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from .server import Server, start_server
from .test_concurrency import fresh_demo

#: Debian's chromium (`make test` installs it); Playwright's own browser
#: downloads are never used.
CHROMIUM = Path("/usr/bin/chromium")
#: Milliseconds the page may take to show something (it polls every second).
SHOWN_MS = 30_000


@pytest.fixture
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (`make test` does)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                              args=["--no-sandbox"])  # fmt: skip
        yield launched
        launched.close()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    """A registry of two workers showing the page, and another server on the
    same store, whose builds the page must show too (a worker of the first
    could serve either; this way the test does not depend on the kernel's
    choice of worker)."""
    demo, _ = fresh_demo(tmp_path)  # `slow` unbuilt: its build takes two seconds
    source = ("--pkgs-path", str(demo))
    store = tmp_path / "store"
    page_server = start_server(tmp_path / "a", source=source, extra=("--workers", "2"),
                               storage=store)  # fmt: skip
    try:
        builder = start_server(tmp_path / "b", source=source, extra=("--workers", "1"),
                               storage=store)  # fmt: skip
    except BaseException:
        page_server.stop()
        raise
    yield page_server, builder
    builder.stop()
    page_server.stop()


def save_screenshot(page: Page, tmp_path: Path, name: str) -> Path:
    """A full-page PNG under the test's directory, copied to $NIXERY_TEST_ARTIFACTS if set."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    artifacts = os.environ.get("NIXERY_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artifacts) / name)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return path


def test_the_page_shows_builds_live_and_works_without_javascript(
    servers: tuple[Server, Server], browser: Browser, tmp_path: Path
) -> None:
    page_server, builder = servers
    page = browser.new_page()
    console_errors: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            console_errors.append(message.text)

    page.on("console", on_console)
    page.goto(page_server.url + "/")
    expect(page.locator("#pull")).to_contain_text(f"docker pull {page_server.host}/shell/hello")
    expect(page.locator("#source")).to_contain_text("content hash (blake3)")
    expect(page.locator("#building")).to_have_attribute("data-empty", "yes")
    expect(page.locator("#liveness")).to_have_text("updated live.")

    with ThreadPoolExecutor(1) as pool:
        pulled = pool.submit(httpx.get, f"{builder.url}/v2/slow/hello/manifests/latest",
                             timeout=120)  # fmt: skip
        building = page.locator("#building tbody tr", has_text="slow/hello:latest")
        expect(building).to_have_count(1, timeout=SHOWN_MS)
        expect(page.locator("#building")).to_have_attribute("data-empty", "no")
        save_screenshot(page, tmp_path, "web-building.png")
        assert pulled.result().status_code == 200

    built = page.locator("#built tbody tr", has_text="slow/hello:latest")
    expect(built).to_have_count(1, timeout=SHOWN_MS)
    expect(page.locator("#building")).to_have_attribute("data-empty", "yes")
    expect(page.locator("#store")).to_contain_text("slow/hello:latest", timeout=SHOWN_MS)

    missing = httpx.get(f"{page_server.url}/v2/nosuchpkg/manifests/latest", timeout=120)
    assert missing.status_code == 404
    failed = page.locator("#failed tbody tr", has_text="nosuchpkg:latest")
    expect(failed).to_have_count(1, timeout=SHOWN_MS)
    expect(failed).to_contain_text("packages not found in the package set: nosuchpkg")
    save_screenshot(page, tmp_path, "web-built.png")
    assert console_errors == []  # no script error, nothing the CSP blocked

    # Without JavaScript: the same content, rendered by the server.
    still = browser.new_page(java_script_enabled=False)
    still.goto(page_server.url + "/")
    expect(still.locator("#built tbody tr", has_text="slow/hello:latest")).to_have_count(1)
    expect(still.locator("#failed")).to_contain_text("nosuchpkg")
    expect(still.locator("#liveness")).to_have_text("reload the page for the latest.")
    # And by plain HTTP, on new connections (so by either worker).
    for _ in range(6):
        response = httpx.get(page_server.url + "/", timeout=30)
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        text = response.text
        assert f"docker pull {page_server.host}/shell/hello" in text
        assert "<td>slow/hello:latest</td>" in text and "<td>nosuchpkg:latest</td>" in text
        assert "packages not found in the package set: nosuchpkg" in text
    status = httpx.get(page_server.url + "/status.json", timeout=30).json()
    assert [a["image"] for a in status["built"]] == ["slow/hello"]
    assert status["built"][0]["layers_written"] > 0 and status["building"] == []
    # A Host header that is not a plain host[:port] is not repeated.
    odd = httpx.get(page_server.url + "/", headers={"Host": "<b>x</b>"}, timeout=30)
    assert "<b>x" not in odd.text and f"docker pull {page_server.host}/" in odd.text
