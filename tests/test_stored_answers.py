"""Stored answers fetched again (OpenAI stores responses by default, chat completions with `store`): the upstream
keeps a blocked answer as it was generated, and the client holds its id, so a GET must not hand it out."""

from __future__ import annotations

import openai
import pytest

from tests.doubles import ASK_UNSAFE_ANSWER, UNSAFE, ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.sdk import BLOCKED_OUTPUT, ask
from tests.serving import Proxy


def test_a_blocked_response_fetched_by_id_stays_blocked(proxy: Proxy, upstream: FakeUpstream) -> None:
    with proxy.client() as client:
        made = client.responses.create(model="fake-model", input=f"{ASK_UNSAFE_ANSWER} now")
        raw = client.responses.with_raw_response.retrieve(made.id)
    fetched = raw.parse()
    assert made.output_text == fetched.output_text == BLOCKED_OUTPUT
    assert fetched.incomplete_details is not None and fetched.incomplete_details.reason == "content_filter"
    assert UNSAFE not in raw.http_response.text
    assert UNSAFE in str(upstream.stored[made.id])  # the upstream really holds the unsafe text


def test_a_safe_stored_response_is_returned_as_stored(proxy: Proxy, guard: ScriptedGuard) -> None:
    with proxy.client() as client:
        made = client.responses.create(model="fake-model", input="hello")
        fetched = client.responses.retrieve(made.id)
    assert fetched.output_text == "Echo: hello"
    assert fetched.status == "completed"
    assert guard.judged("output") == ["Echo: hello"] * 2  # judged again: the GET does not carry the prompt


def test_blocked_chat_completions_fetched_again_stay_blocked(proxy: Proxy) -> None:
    with proxy.client() as client:
        made = ask(client, f"{ASK_UNSAFE_ANSWER} now")
        one = client.chat.completions.with_raw_response.retrieve(made.id)
        listed = client.chat.completions.with_raw_response.list()
    assert one.parse().choices[0].message.content == BLOCKED_OUTPUT
    assert one.parse().choices[0].finish_reason == "content_filter"
    assert [item.choices[0].message.content for item in listed.parse().data] == [BLOCKED_OUTPUT]
    assert UNSAFE not in one.http_response.text + listed.http_response.text


def test_an_unknown_id_gets_the_upstreams_404(proxy: Proxy) -> None:
    with proxy.client() as client, pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_missing")


def test_deleting_a_stored_response_is_forwarded(proxy: Proxy, upstream: FakeUpstream) -> None:
    with proxy.client() as client:
        made = client.responses.create(model="fake-model", input="hello")
        client.responses.delete(made.id)
    assert [call.method for call in upstream.calls(f"/v1/responses/{made.id}")] == ["DELETE"]
