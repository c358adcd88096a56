"""Buffer mode within `stream.max_held_bytes`: an answer over the cap is not held further, and none of it, never
judged, reaches the client; the stream ends with the error event a broken-off stream ends with (its code
content_too_long where the API's error codes allow it; real loopback)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from tests.conftest import MakeProxy
from tests.doubles import ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.serving import write_policy

# Well over 1024 bytes of events: each word comes in an event of more than 100 bytes.
LONG_ANSWER = " ".join(f"word{n:03d}" for n in range(200)) + "."


def _chat(client: openai.OpenAI) -> tuple[str, str | None]:
    """The streamed text, and the code and message of the error the SDK raised (None if none)."""
    text = ""
    try:
        with client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "tell"}], stream=True
        ) as stream:
            for piece in stream:
                for choice in piece.choices:
                    text += choice.delta.content or ""
    except openai.APIError as error:
        return text, f"{error.code}: {error.message}"
    return text, None


def _responses(client: openai.OpenAI) -> tuple[str, str | None]:
    """The streamed text, and the code and message of the error the response failed with (None if it did not)."""
    text, failed = "", None
    with client.responses.create(model="fake-model", input="tell", stream=True) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                text += event.delta
            elif event.type == "response.failed" and event.response.error is not None:
                failed = f"{event.response.error.code}: {event.response.error.message}"
    return text, failed


READERS: dict[str, Callable[[openai.OpenAI], tuple[str, str | None]]] = {"chat": _chat, "responses": _responses}


@pytest.mark.parametrize("api", sorted(READERS))
def test_a_buffered_answer_over_max_held_bytes_ends_the_stream_unsent(
    make_proxy: MakeProxy, upstream: FakeUpstream, guard: ScriptedGuard, tmp_path: Path, api: str
) -> None:
    path = write_policy(tmp_path, "small-buffer", stream={"mode": "buffer", "max_held_bytes": 1024})
    proxy = make_proxy(tenants=[{"id": "default", "anonymous": True, "policy": str(path)}])
    upstream.answer, upstream.token_delay_s = LONG_ANSWER, 0.002
    with proxy.client() as client:
        text, failed = READERS[api](client)
    assert text == "" and failed is not None and "stream.max_held_bytes" in failed
    assert failed.startswith("content_too_long: ")  # the client's doing, in both APIs: not a server error
    assert guard.judged("output") == []  # nothing was judged, so nothing was sent
    assert upstream.aborted.wait(5)  # the proxy stopped reading the upstream at the cap


@pytest.mark.parametrize("api", sorted(READERS))
def test_a_buffered_answer_within_max_held_bytes_is_judged_and_sent(
    make_proxy: MakeProxy, upstream: FakeUpstream, guard: ScriptedGuard, tmp_path: Path, api: str
) -> None:
    path = write_policy(tmp_path, "large-buffer", stream={"mode": "buffer", "max_held_bytes": 1024 * 1024})
    proxy = make_proxy(tenants=[{"id": "default", "anonymous": True, "policy": str(path)}])
    upstream.answer = LONG_ANSWER
    with proxy.client() as client:
        text, failed = READERS[api](client)
    assert text == LONG_ANSWER and failed is None
    assert guard.judged("output") == [LONG_ANSWER]
