"""TenantDirectory: proxy keys (sha256 digests or environment variables) resolve to exactly one tenant."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import pydantic
import pytest

from rsafe_proxy.config import TenantSettings
from rsafe_proxy.errors import Unauthorized
from rsafe_proxy.policy.tenants import Tenant, TenantDirectory
from tests.conftest import MakeProxy
from tests.fake_upstream import FakeUpstream


def sha(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def directory(tenants: Sequence[dict[str, Any]], env: dict[str, str] | None = None) -> TenantDirectory:
    return TenantDirectory([TenantSettings.model_validate(tenant) for tenant in tenants], env or {})


TENANTS: list[dict[str, Any]] = [
    {"id": "bank", "keys": [sha("sk-bank-1"), "env:BANK_KEY"], "policy": "bank.yaml"},
    {
        "id": "health",
        "keys": [sha("sk-health")],
        "upstream": {"base_url": "http://health-llm/v1", "api_key": "sk-upstream-health"},
    },
]


@pytest.mark.parametrize(
    ("authorization", "tenant"),
    [
        ("Bearer sk-bank-1", "bank"),
        ("Bearer sk-bank-2", "bank"),  # from the environment
        ("bearer sk-bank-1", "bank"),
        ("Bearer   sk-health  ", "health"),
    ],
)
def test_a_key_resolves_to_its_tenant(authorization: str, tenant: str) -> None:
    resolved = directory(TENANTS, {"BANK_KEY": "sk-bank-2"}).resolve(authorization)
    assert (resolved.id, resolved.keyed) == (tenant, True)


def test_a_tenant_carries_its_upstream_override() -> None:
    tenants = directory(TENANTS)
    assert tenants.resolve("Bearer sk-health") == Tenant("health", True, "http://health-llm/v1", "sk-upstream-health")
    assert tenants.resolve("Bearer sk-bank-1") == Tenant("bank", True, None, None)


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Bearer sk-nobody", "Basic c2stYmFuay0x", "sk-bank-1", "Bearer sk-bank-1x"],
)
def test_no_key_or_an_unknown_key_is_unauthorized(authorization: str | None) -> None:
    with pytest.raises(Unauthorized) as raised:
        directory(TENANTS, {"BANK_KEY": "sk-bank-2"}).resolve(authorization)
    assert raised.value.status == 401
    assert raised.value.code == "invalid_api_key"


def test_an_unknown_key_never_falls_back_to_the_anonymous_tenant() -> None:
    tenants = directory([*TENANTS, {"id": "dev", "anonymous": True}])
    assert tenants.resolve(None) == Tenant("dev", False)
    assert tenants.resolve("Bearer sk-bank-1").id == "bank"
    with pytest.raises(Unauthorized):
        tenants.resolve("Bearer sk-wrong")


def test_drop_in_mode_takes_any_bearer_token_as_the_clients_own_upstream_key() -> None:
    tenants = directory([{"id": "default", "anonymous": True}])
    assert not tenants.has_keys
    assert tenants.resolve("Bearer sk-openai-of-the-client") == Tenant("default", False)


def test_no_anonymous_tenant_unless_configured() -> None:
    with pytest.raises(Unauthorized, match="Missing API key"):
        directory(TENANTS).resolve(None)


@pytest.mark.parametrize("env", [{}, {"BANK_KEY": ""}])
def test_an_unset_env_key_is_reported_and_matches_nothing(env: dict[str, str]) -> None:
    tenants = directory(TENANTS, env)
    assert tenants.missing_env == ["BANK_KEY"]
    with pytest.raises(Unauthorized):
        tenants.resolve("Bearer ")


@pytest.mark.parametrize(
    ("tenants", "env"),
    [
        ([{"id": "a", "keys": [sha("k")]}, {"id": "b", "keys": [sha("k")]}], {}),
        ([{"id": "a", "keys": [sha("k")]}, {"id": "b", "keys": ["env:B"]}], {"B": "k"}),
        ([{"id": "a", "keys": ["env:A"]}, {"id": "b", "keys": ["env:B"]}], {"A": "k", "B": "k"}),
    ],
)
def test_one_key_for_two_tenants_is_refused(tenants: list[dict[str, Any]], env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="tenants 'a' and 'b' are given the same API key"):
        directory(tenants, env)


def test_the_same_key_twice_for_one_tenant_is_harmless() -> None:
    tenants = directory([{"id": "a", "keys": [sha("k"), "env:A"]}], {"A": "k"})
    assert tenants.resolve("Bearer k").id == "a"


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("sk-in-clear", "never the key itself"),
        ("sha256:" + "A" * 64, "64 lowercase hex digits"),
        ("sha256:abc", "64 lowercase hex digits"),
    ],
)
def test_keys_in_proxy_yaml_are_digests_or_variables(key: str, words: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=words):
        TenantSettings.model_validate({"id": "a", "keys": [key]})


# -- through the served proxy: what reaches the upstream --------------------------------------------------------


def _authorization_upstream(
    make_proxy: MakeProxy, upstream: FakeUpstream, api_key: str, config: dict[str, Any] | None = None
) -> str | None:
    proxy = make_proxy(**(config or {}))
    proxy.client(api_key=api_key).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    return upstream.calls("/v1/chat/completions")[-1].headers.get("authorization")


def test_a_keyed_tenants_proxy_key_is_not_forwarded(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    tenants = [{"id": "bank", "keys": [sha("sk-bank-1")]}]
    assert _authorization_upstream(make_proxy, upstream, "sk-bank-1", {"tenants": tenants}) is None


def test_a_keyed_tenant_uses_the_configured_upstream_key(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    tenants = [{"id": "bank", "keys": [sha("sk-bank-1")]}]
    config: dict[str, Any] = {"tenants": tenants, "upstream": {"api_key": "sk-global"}}
    assert _authorization_upstream(make_proxy, upstream, "sk-bank-1", config) == "Bearer sk-global"


def test_a_tenants_own_upstream_overrides_the_global_one(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    tenants = [
        {"id": "health", "keys": [sha("sk-health")], "upstream": {"base_url": f"{upstream.url}/v1", "api_key": "sk-h"}}
    ]
    config: dict[str, Any] = {"tenants": tenants, "upstream": {"base_url": "http://127.0.0.1:9/v1", "api_key": "x"}}
    assert _authorization_upstream(make_proxy, upstream, "sk-health", config) == "Bearer sk-h"


def test_the_anonymous_drop_in_tenant_forwards_the_clients_key(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    assert _authorization_upstream(make_proxy, upstream, "sk-client-own") == "Bearer sk-client-own"
