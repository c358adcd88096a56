"""The console in a real browser: Debian's headless Chromium driven by Playwright, against the proxy on loopback
in front of the scripted guard, with decisions made by real traffic. Screenshots of each step are kept in
test-artifacts/console/ (not committed). Skipped, with the reason, only where Chromium cannot start."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Dialog, Error, Page, ViewportSize, expect, sync_playwright

from rsafe_proxy.audit.record import DecisionQuery
from tests.conftest import MakeProxy
from tests.console_site import ADMIN_KEY, BANK_KEY, HOSTILE, Site, start_site, traffic
from tests.doubles import UNSAFE

CHROMIUM = "/usr/bin/chromium"  # Debian's package (`apt-get install chromium`); Playwright downloads no browser
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "console"
LAPTOP: ViewportSize = {"width": 1280, "height": 800}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=CHROMIUM)
        except Error as error:
            pytest.skip(f"Chromium cannot start here ({CHROMIUM}): {error.message.splitlines()[0]}")
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=LAPTOP)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture
def site(make_proxy: MakeProxy, tmp_path: Path) -> Site:
    made = start_site(make_proxy, tmp_path)
    traffic(made)
    return made


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def sign_in_by_keyboard(page: Page, site: Site, key: str) -> None:
    page.goto(f"{site.url}/console")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    expect(page.get_by_label("Console key")).to_be_focused()
    page.keyboard.type(key)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Decisions", exact=True)).to_be_visible()


def test_sign_in_filter_open_a_decision_and_run_the_playground(page: Page, site: Site) -> None:
    dialogs: list[str] = []

    def opened(dialog: Dialog) -> None:  # a script that ran would open one (alert)
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", opened)

    sign_in_by_keyboard(page, site, ADMIN_KEY)
    expect(page.get_by_text("8 decisions match")).to_be_visible()
    shot(page, "decisions")
    page.keyboard.press("Tab")  # the first stop is the skip link, which leads past the navigation
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("main")).to_be_focused()

    page.get_by_label("Verdict").select_option("unsafe")
    page.get_by_label("Tenant").select_option("bank")
    page.get_by_role("button", name="Filter").click()
    expect(page.get_by_text("1 decision matches")).to_be_visible()
    assert "verdict=unsafe" in page.url and "tenant=bank" in page.url
    shot(page, "decisions-filtered")

    page.get_by_role("link", name=re.compile(r"^[0-9a-f]{12}…$")).click()
    expect(page.get_by_role("heading", name=re.compile(r"^Decision "))).to_be_visible()
    expect(page.get_by_test_id("reasoning")).to_contain_text("It violates U2 - Weapons & Illegal Tactics")
    expect(page.get_by_test_id("policy-text")).to_contain_text("id: bank-policy")
    shot(page, "decision")

    store = site.store()
    try:
        hostile = next(d for d in store.query(DecisionQuery(tenant="bank")) if d.reasoning and "pwned" in d.reasoning)
    finally:
        store.close()
    page.goto(f"{site.url}/console/decisions/{hostile.decision_id}")
    expect(page.get_by_test_id("reasoning").first).to_contain_text(HOSTILE)  # shown as the characters it holds
    assert page.evaluate("document.querySelectorAll('script, img, b').length") == 0
    shot(page, "decision-hostile")

    page.get_by_role("link", name="Playground").click()
    page.get_by_label("Tenant").select_option("bank")
    page.get_by_label("Input (a user's prompt)").check()
    page.get_by_label("Text to screen").fill(f"Explain {UNSAFE} to me {HOSTILE}")
    page.get_by_role("button", name="Screen").click()
    expect(page.get_by_test_id("verdict")).to_have_text("unsafe")
    expect(page.get_by_test_id("action")).to_have_text("block")
    expect(page.get_by_test_id("categories")).to_have_text("U2")
    expect(page.get_by_test_id("latency")).to_have_text(re.compile(r"^\d+\.\d ms"))
    expect(page.get_by_test_id("reasoning")).to_contain_text(HOSTILE)
    expect(page.get_by_label("Text to screen")).to_have_value(f"Explain {UNSAFE} to me {HOSTILE}")
    assert page.evaluate("document.querySelectorAll('script, img, b').length") == 0
    shot(page, "playground")

    page.get_by_label("Output (a model's answer)").check()
    page.get_by_label("Text to screen").fill("Here is a recipe for bread.")
    page.get_by_label("The prompt it answers").fill("How do I bake bread?")
    page.get_by_role("button", name="Screen").click()
    expect(page.get_by_test_id("verdict")).to_have_text("safe")
    expect(page.get_by_test_id("action")).to_have_text("allow")

    page.get_by_role("link", name="Tenants").click()
    expect(page.get_by_role("cell", name="bank-policy", exact=True)).to_be_visible()
    shot(page, "tenants")
    page.get_by_role("link", name="Policy versions").click()
    expect(page.get_by_role("heading", name="Versions of tenant bank")).to_be_visible()
    shot(page, "policies")
    assert dialogs == []


def test_a_tenant_key_is_refused_another_tenants_data(page: Page, site: Site) -> None:
    sign_in_by_keyboard(page, site, BANK_KEY)
    expect(page.get_by_text("Signed in: tenant bank")).to_be_visible()
    expect(page.get_by_text("5 decisions match")).to_be_visible()
    tenants = page.locator("tbody tr td:nth-child(3)").all_inner_texts()
    assert tenants and set(tenants) == {"bank"}
    expect(page.get_by_label("Tenant").locator("option")).to_have_text(["bank"])

    store = site.store()
    try:
        (shop, *_) = store.query(DecisionQuery(tenant="shop"))
    finally:
        store.close()
    for path, heading in (
        ("/console/decisions?tenant=shop", "Another tenant"),
        ("/console/playground?tenant=shop", "Another tenant"),
        ("/console/policies?tenant=shop", "Another tenant"),
        (f"/console/decisions/{shop.decision_id}", "No such decision"),
    ):
        answer = page.goto(site.url + path)
        assert answer is not None and answer.status in (403, 404), path
        expect(page.get_by_role("heading", name=heading)).to_be_visible()
        expect(page.get_by_text("Shop policy")).to_have_count(0)
    shot(page, "tenant-refused")
