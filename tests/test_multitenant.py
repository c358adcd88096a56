"""Tenants end to end, through the OpenAI SDK against the proxy served by uvicorn, in front of the doubles.

The scripted guard calls any text holding UNSAFE unsafe and names category U2 in its reasoning; each tenant's
policy decides what that means for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import MakeProxy
from tests.doubles import ASK_UNSAFE_ANSWER, UNSAFE, UNSAFE_ANSWER, ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.serving import Proxy, write_policy

KEYS = {"team-a": "sk-team-a", "team-b": "sk-team-b"}
MESSAGES = {
    "block": {"input": "BLOCKED-IN", "output": "BLOCKED-OUT"},
    "rewrite": {"input": "INSTRUCTION: say you cannot help with that.", "output": "REWRITTEN-OUT"},
}


def sha(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def category(action: str, side: str = "both") -> list[dict[str, str]]:
    return [{"id": "U2", "name": "Weapons & Illegal Tactics", "action": action, "side": side}]


def tenants(policies: dict[str, Path]) -> list[dict[str, Any]]:
    return [{"id": tenant, "keys": [sha(KEYS[tenant])], "policy": str(path)} for tenant, path in policies.items()]


def decisions(proxy: Proxy) -> dict[tuple[str, str, str], float]:
    """The proxy's decision counters: (tenant, side, outcome) -> count."""
    text = httpx.get(f"{proxy.url}/metrics").text
    pattern = r'rsafe_decisions_total\{outcome="(\w+)",side="(\w+)",tenant="([\w-]+)"\} (\S+)'
    return {(tenant, side, outcome): float(n) for outcome, side, tenant, n in re.findall(pattern, text)}


def edit(path: Path, text: str) -> None:
    """Write `text` and move the mtime on, so that the edit is seen even on a coarse clock."""
    before = path.stat().st_mtime_ns
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def two_tenants(make_proxy: MakeProxy, tmp_path: Path) -> Proxy:
    """team-a flags U2, team-b blocks it."""
    lenient = write_policy(tmp_path, "lenient", categories=category("flag"), messages=MESSAGES)
    strict = write_policy(tmp_path, "strict", categories=category("block"), messages=MESSAGES)
    return make_proxy(tenants=tenants({"team-a": lenient, "team-b": strict}))


def ask(client: openai.OpenAI, text: str, **options: Any) -> Any:
    return client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": text}], **options
    )


def test_two_tenants_get_different_decisions_for_the_same_text(two_tenants: Proxy) -> None:
    text = f"How do I make {UNSAFE}?"

    flagged = ask(two_tenants.client(KEYS["team-a"]), text)
    assert flagged.parse().choices[0].message.content == f"Echo: {text}"
    assert flagged.headers["x-rsafe-tenant"] == "team-a"
    assert flagged.headers["x-rsafe-input"] == "flag"
    assert flagged.headers["x-rsafe-policy"].startswith("lenient@")

    with pytest.raises(openai.BadRequestError) as blocked:
        ask(two_tenants.client(KEYS["team-b"], max_retries=0), text)
    assert blocked.value.code == "content_filter"
    assert blocked.value.body == {
        "message": "BLOCKED-IN",
        "type": "invalid_request_error",
        "param": None,
        "code": "content_filter",
        "categories": ["U2"],
        "policy": "strict",
        # the decision id (the trace id), as in the x-rsafe-decision-id header
        "decision_id": blocked.value.response.headers["x-rsafe-decision-id"],
    }
    assert blocked.value.response.headers["x-should-retry"] == "false"

    # team-a's answer echoes the text: flagged on output too
    expected = {("team-a", "input", "flag"): 1, ("team-a", "output", "flag"): 1, ("team-b", "input", "block"): 1}
    assert decisions(two_tenants) == expected


SPOOFS: list[dict[str, Any]] = [
    {"extra_headers": {"x-rsafe-tenant": "team-b", "x-tenant-id": "team-b", "x-rsafe-policy": "strict"}},
    {"extra_headers": {"openai-organization": "team-b", "openai-project": "team-b", "api-key": KEYS["team-b"]}},
    {"extra_headers": {"x-api-key": KEYS["team-b"], "proxy-authorization": f"Bearer {KEYS['team-b']}"}},
    {"extra_body": {"tenant": "team-b", "policy": "strict", "metadata": {"tenant": "team-b"}}},
    {"user": "team-b", "extra_query": {"tenant": "team-b", "policy": "strict", "api_key": KEYS["team-b"]}},
]


@pytest.mark.parametrize("spoof", SPOOFS, ids=["tenant-headers", "openai-headers", "key-headers", "body", "query"])
def test_no_header_body_or_query_field_changes_the_tenant(two_tenants: Proxy, spoof: dict[str, Any]) -> None:
    text = f"How do I make {UNSAFE}?"
    flagged = ask(two_tenants.client(KEYS["team-a"]), text, **spoof)
    assert (flagged.headers["x-rsafe-tenant"], flagged.headers["x-rsafe-input"]) == ("team-a", "flag")

    swapped = json.loads(json.dumps(spoof).replace("team-b", "team-a").replace("strict", "lenient"))
    with pytest.raises(openai.BadRequestError) as blocked:
        ask(two_tenants.client(KEYS["team-b"], max_retries=0), text, **swapped)
    assert blocked.value.body["policy"] == "strict"  # type: ignore[index]


def test_a_key_of_no_tenant_is_refused_and_never_reaches_the_upstream(
    two_tenants: Proxy, upstream: FakeUpstream, guard: ScriptedGuard
) -> None:
    for key in ("sk-team-c", sha(KEYS["team-a"]), KEYS["team-a"].upper(), KEYS["team-a"][:-1]):
        with pytest.raises(openai.AuthenticationError):
            ask(two_tenants.client(key, max_retries=0), "hello")
    assert upstream.calls() == [] and guard.calls == []


@pytest.mark.parametrize("screening", ["sequential", "parallel"])
def test_rewrite_on_input_sends_the_tenants_instruction_upstream(
    make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path, screening: str
) -> None:
    policy = write_policy(tmp_path, "rewriting", categories=category("rewrite", "input"), messages=MESSAGES)
    proxy = make_proxy(tenants=tenants({"team-a": policy}), server={"input_screening": screening})
    client = proxy.client(KEYS["team-a"])
    instruction = MESSAGES["rewrite"]["input"]
    history: list[Any] = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "hello"}]
    client.chat.completions.create(model="m", messages=history)  # "hello" is now known to be safe
    conversation = [*history, {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": f"Make {UNSAFE}"}]

    answer = client.chat.completions.with_raw_response.create(model="m", messages=conversation)
    assert answer.headers["x-rsafe-input"] == "rewrite"
    assert answer.parse().choices[0].message.content == f"Echo: {instruction}"
    stream = client.chat.completions.create(model="m", messages=conversation, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == f"Echo: {instruction}"
    completion = client.completions.create(model="m", prompt=f"Make {UNSAFE}")
    assert completion.choices[0].text == f"Echo: {instruction}"

    rewritten = [call.body for call in upstream.calls() if instruction in json.dumps(call.body)]
    # the turns after the conversation known to be safe are replaced: the client's assistant turn is one of them
    assert [body["messages"] for body in rewritten[:2]] == [
        [*conversation[:2], {"role": "assistant", "content": instruction}, {"role": "user", "content": instruction}]
    ] * 2
    assert rewritten[1]["stream"] is True
    assert rewritten[2]["prompt"] == instruction
    if screening == "sequential":
        # (in parallel mode the upstream call starts with the prompt and is dropped once the verdict comes)
        assert not any(UNSAFE in json.dumps(call.body) for call in upstream.calls())


def _answer_text(client: openai.OpenAI, kind: str, stream: bool) -> tuple[str, str | None]:
    """The answer's text and finish reason, for a prompt that makes the upstream answer unsafely."""
    prompt = f"Please {ASK_UNSAFE_ANSWER}"
    if kind == "chat":
        messages: Any = [{"role": "user", "content": prompt}]
        if not stream:
            choice = client.chat.completions.create(model="m", messages=messages).choices[0]
            return choice.message.content or "", choice.finish_reason
        chunks = [
            chunk.choices[0] for chunk in client.chat.completions.create(model="m", messages=messages, stream=True)
        ]
        return "".join(chunk.delta.content or "" for chunk in chunks), chunks[-1].finish_reason
    if not stream:
        only = client.completions.create(model="m", prompt=prompt).choices[0]
        return only.text, only.finish_reason
    parts = [chunk.choices[0] for chunk in client.completions.create(model="m", prompt=prompt, stream=True)]
    return "".join(part.text for part in parts), parts[-1].finish_reason


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize(
    ("action", "text", "finish"),
    [
        ("block", "BLOCKED-OUT", "content_filter"),
        ("rewrite", "REWRITTEN-OUT", "content_filter"),
        ("flag", UNSAFE_ANSWER, "stop"),
    ],
)
def test_output_actions(
    make_proxy: MakeProxy,
    guard: ScriptedGuard,
    tmp_path: Path,
    action: str,
    text: str,
    finish: str,
    kind: str,
    stream: bool,
) -> None:
    policy = write_policy(tmp_path, "answers", categories=category(action, "output"), messages=MESSAGES)
    proxy = make_proxy(tenants=tenants({"team-a": policy}))
    assert _answer_text(proxy.client(KEYS["team-a"]), kind, stream) == (text, finish)
    assert guard.judged("output") == [UNSAFE_ANSWER]
    assert decisions(proxy)[("team-a", "output", action)] == 1


def test_a_long_stream_is_cut_at_the_violating_window(
    make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    policy = write_policy(
        tmp_path,
        "windows",
        categories=category("rewrite", "output"),
        messages=MESSAGES,
        stream={"window_chars": 64, "overlap_chars": 16},
    )
    proxy = make_proxy(tenants=tenants({"team-a": policy}))
    safe = "All good here. " * 12
    upstream.answer = safe + f"Now the bad part: {UNSAFE}. " + "More words after it. " * 5
    stream = proxy.client(KEYS["team-a"]).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = [chunk.choices[0] for chunk in stream]
    received = "".join(chunk.delta.content or "" for chunk in chunks)
    assert received.endswith("REWRITTEN-OUT") and chunks[-1].finish_reason == "content_filter"
    released = received.removesuffix("REWRITTEN-OUT")
    # the safe windows went out before the verdict on the bad one; nothing of or after the bad one did
    assert len(released) >= 64 and upstream.answer.startswith(released)
    assert UNSAFE not in received and "after it" not in received


def test_a_request_keeps_the_policy_version_it_started_with(
    make_proxy: MakeProxy, guard: ScriptedGuard, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path, "live", categories=category("block"), messages=MESSAGES)
    proxy = make_proxy(tenants=tenants({"team-a": policy}), policy_reload_s=0.02)
    client = proxy.client(KEYS["team-a"], max_retries=0)
    version = ask(client, "hello").headers["x-rsafe-policy"]
    guard.delay_s = 0.4
    outcome: list[BaseException] = []

    def in_flight() -> None:
        try:
            ask(client, f"Make {UNSAFE}")
        except openai.BadRequestError as error:
            outcome.append(error)

    worker = threading.Thread(target=in_flight)
    worker.start()
    wait_for(lambda: len(guard.calls) == 3)
    edit(policy, policy.read_text().replace("action: block", "action: flag"))
    serving = version.split("@")[1]
    wait_for(lambda: httpx.get(f"{proxy.url}/readyz").json()["policies"]["team-a"] != serving)
    assert worker.is_alive()  # the new version came while the request was being screened
    worker.join()
    assert len(outcome) == 1  # ... and the request was decided by the version it started with

    guard.delay_s = 0
    flagged = ask(client, f"Make {UNSAFE}")
    assert flagged.headers["x-rsafe-input"] == "flag"
    assert flagged.headers["x-rsafe-policy"] != version


def test_an_unsafe_conversation_does_not_make_its_safe_turns_unsafe(two_tenants: Proxy) -> None:
    client = two_tenants.client(KEYS["team-b"], max_retries=0)
    conversation: list[Any] = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": f"Make {UNSAFE}"},
    ]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=conversation)
    assert ask(client, "hello").parse().choices[0].message.content == "Echo: hello"


def test_a_user_cannot_pick_a_milder_category_by_naming_it(make_proxy: MakeProxy, tmp_path: Path) -> None:
    # the scripted guard quotes the text it judges: "... P1" would be read back as the guard naming P1
    categories = [{"id": "P1", "name": "Profanity", "action": "flag"}, {"id": "W1", "name": "Weapons"}]
    policy = write_policy(tmp_path, "quoted", categories=categories, messages=MESSAGES)
    proxy = make_proxy(tenants=tenants({"team-a": policy}))
    with pytest.raises(openai.BadRequestError) as blocked:
        ask(proxy.client(KEYS["team-a"], max_retries=0), f"Make {UNSAFE}, this is only P1")
    assert blocked.value.body["categories"] == []  # type: ignore[index]  # none attributed: the default action


def test_a_broken_policy_edit_under_traffic_loses_no_request_and_changes_no_decision(
    make_proxy: MakeProxy, tmp_path: Path
) -> None:
    lenient = write_policy(tmp_path, "lenient", categories=category("flag"), messages=MESSAGES)
    strict = write_policy(tmp_path, "strict", categories=category("block"), messages=MESSAGES)
    proxy = make_proxy(tenants=tenants({"team-a": lenient, "team-b": strict}), policy_reload_s=0.02)
    versions = {tenant: ask(proxy.client(KEYS[tenant]), "hi").headers["x-rsafe-policy"] for tenant in KEYS}
    good = strict.read_text()
    broken_edits = [
        good.replace("action: block", "action: blok"),
        good.replace("categories:", "categories: [", 1),
        good.replace("categories:\n", "categories:\n- {id: u2, name: Twice}\n"),
        "",
        good + "\tcolour: red\n",
    ]
    stop = threading.Event()
    failures: list[str] = []
    served: list[int] = []

    def traffic(tenant: str, number: int) -> None:
        client = proxy.client(KEYS[tenant], max_retries=0)
        turn = 0
        while not stop.is_set():
            turn += 1
            unsafe = turn % 2 == 0
            text = f"{tenant} {number} {turn} " + (UNSAFE if unsafe else "hello")
            try:
                reply = ask(client, text)
                if unsafe and tenant == "team-b":
                    failures.append(f"not blocked: {text}")
                elif reply.headers["x-rsafe-input"] != ("flag" if unsafe else "allow"):
                    failures.append(f"{text}: {reply.headers['x-rsafe-input']}")
                if reply.headers["x-rsafe-policy"] != versions[tenant]:
                    failures.append(f"{text}: served by {reply.headers['x-rsafe-policy']}")
            except openai.BadRequestError as error:
                if not (unsafe and tenant == "team-b" and error.code == "content_filter"):
                    failures.append(f"{text}: {error}")
            except openai.APIError as error:
                failures.append(f"{text}: {type(error).__name__} {error}")
            served.append(1)

    workers = [threading.Thread(target=traffic, args=(tenant, n)) for tenant in KEYS for n in range(3)]
    for worker in workers:
        worker.start()
    try:
        for broken in broken_edits:
            edit(strict, broken)
            wait_for(lambda: "team-b" in httpx.get(f"{proxy.url}/readyz").json()["policy_errors"])
            time.sleep(0.05)
            edit(strict, good)
            wait_for(lambda: httpx.get(f"{proxy.url}/readyz").json()["policy_errors"] == {})
        wait_for(lambda: len(served) > 50, seconds=30)  # traffic went on across the edits (however fast they went)
    finally:
        stop.set()
        for worker in workers:
            worker.join()

    assert failures == []
    assert len(served) > 50
    metrics = httpx.get(f"{proxy.url}/metrics").text
    assert f"rsafe_policy_reload_errors_total {float(len(broken_edits))}" in metrics

    # a valid edit is then picked up: team-b now flags what it blocked
    edit(strict, good.replace("action: block", "action: flag"))
    client = proxy.client(KEYS["team-b"])
    wait_for(lambda: ask(client, "hello").headers["x-rsafe-policy"] != versions["team-b"])
    assert ask(client, f"Make {UNSAFE}").headers["x-rsafe-input"] == "flag"
