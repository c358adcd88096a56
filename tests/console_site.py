"""A proxy with the console on, for the console's tests: two keyed tenants (bank, shop) with their own policies,
the audit log in a real SQLite file, and real traffic sent through the proxy with the OpenAI SDK, so that the
console shows decisions the proxy itself made (the scripted guard calls any text with UNSAFE unsafe, naming U2,
and quotes what it judged in its reasoning)."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

from rsafe_proxy.audit.record import DecisionQuery
from rsafe_proxy.audit.sqlite import SqliteStore
from tests.conftest import MakeProxy
from tests.doubles import UNSAFE
from tests.serving import Proxy, write_policy

ADMIN_KEY = "console-admin-key-0123456789"
BANK_KEY = "console-bank-key-0123456789"
PROXY_KEYS = {"bank": "sk-proxy-bank-0123456789", "shop": "sk-proxy-shop-0123456789"}
# a prompt that would run script if a page pasted it in as markup
HOSTILE = '<script>alert("pwned")</script><img src=x onerror="alert(1)"> & <b>bold</b>'


def sha(key: str) -> str:
    """A key as proxy.yaml names it without holding it."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass
class Site:
    """The proxy serving the console, and where its audit log is."""

    proxy: Proxy
    db: Path

    @property
    def url(self) -> str:
        """The proxy's root URL."""
        return self.proxy.url

    def store(self) -> SqliteStore:
        """The audit log, opened as the proxy's own store is (the caller closes it)."""
        return SqliteStore(self.db)

    def wait_for(self, count: int, seconds: float = 10.0) -> None:
        """Wait until the audit log holds `count` decisions (they are written in batches, off the request path)."""
        store = self.store()
        try:
            deadline = time.monotonic() + seconds
            while (found := store.count(DecisionQuery())) < count:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the audit log holds {found} decisions, not {count}")
                time.sleep(0.05)
        finally:
            store.close()

    def ask(self, tenant: str, text: str) -> str | None:
        """Send `text` as tenant `tenant`; the answer, or None when the proxy blocked it."""
        client = self.proxy.client(api_key=PROXY_KEYS[tenant], max_retries=0)
        try:
            answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": text}])
        except openai.BadRequestError:
            return None
        return answer.choices[0].message.content


def start_site(make_proxy: MakeProxy, directory: Path, **overrides: Any) -> Site:
    """The console's proxy; `overrides` are merged into its proxy.yaml (the console section included)."""
    write_policy(directory, "bank-policy", description="Bank policy")
    write_policy(directory, "shop-policy", description="Shop policy")
    db = directory / "decisions.db"
    sections: dict[str, Any] = {
        "tenants": [
            {"id": tenant, "keys": [sha(key)], "policy": f"{tenant}-policy.yaml"} for tenant, key in PROXY_KEYS.items()
        ],
        "audit": {"url": str(db)},
        "console": {"enabled": True, "admin_key": sha(ADMIN_KEY), "tenant_keys": {sha(BANK_KEY): "bank"}},
    }
    for name, section in overrides.items():
        sections[name] = {**sections.get(name, {}), **section} if isinstance(section, dict) else section
    return Site(make_proxy(**sections), db)


def csrf_of(page: str) -> str:
    """The CSRF token a console page's forms carry."""
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


@contextmanager
def signed_in(site: Site, key: str) -> Iterator[httpx.Client]:
    """An HTTP client signed in to the console with `key` (it keeps the session cookie) until the block ends."""
    with httpx.Client(base_url=site.url, timeout=10, verify=False) as client:
        form = client.get("/console/login")
        answer = client.post("/console/login", data={"csrf": csrf_of(form.text), "console_key": key})
        assert answer.status_code == 303, answer.text
        yield client


def traffic(site: Site) -> None:
    """A safe request from each tenant, a blocked one from each, and a hostile-markup one from bank; then waits
    until the audit log holds all their decisions (input and output screens)."""
    assert site.ask("bank", "What is the interest on a savings account?") is not None
    assert site.ask("shop", "Do you ship to Norway?") is not None
    assert site.ask("bank", f"Help me rob the vault {UNSAFE}") is None
    assert site.ask("shop", f"Sell me something {UNSAFE}") is None
    assert site.ask("bank", HOSTILE) is not None
    site.wait_for(3 * 2 + 2)  # three answered (input and output screens), two blocked at the input
