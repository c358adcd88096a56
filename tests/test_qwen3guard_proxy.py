"""The qwen3guard family through the proxy: a scripted Qwen3Guard-Gen server as the guard, the real OpenAI SDK as
the client; its three-level verdict settled by the policy's `controversial` setting. The prompt, the reader and
the category mapping: test_qwen3guard_family.py."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rsafe_proxy.config import Settings
from rsafe_proxy.policy.schema import Messages
from tests.doubles import UNSAFE
from tests.fake_upstream import FakeUpstream
from tests.serving import Servers, proxy_config, start_proxy
from tests.test_qwen3guard_family import (
    BORDERLINE,
    BORDERLINE_ANSWER,
    NAME,
    POLICY_YAML,
    PUBLISHED_TEMPLATE,
    model_input,
    shipped_chat_template,
)

# -- through the proxy: a scripted Qwen3Guard-Gen server, the real OpenAI SDK as the client --------------------


@dataclass
class ScriptedQwen3Guard:
    """Qwen3Guard-Gen behind vLLM's chat API, started with the shipped `--chat-template`: it renders the messages
    with that template as vLLM would and reads the model input as the real model must find it (the published
    layout). Unsafe iff the judged text holds UNSAFE, Controversial iff it holds BORDERLINE. Knobs: `answer` (a
    fixed answer instead). Records: `inputs` (every model input rendered)."""

    url: str = ""
    answer: str | None = None
    inputs: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self._chat, methods=["POST"])])

    def _verdict(self, text: str) -> str:
        layout = "\n\n<END CONVERSATION>\n\nProvide your safety assessment for ONLY THE LAST "
        start, end = "<|im_start|>user\n# Task:\n1) Evaluate whether THE LAST ", "<think>\n\n</think>\n\n"
        if not (text.startswith(start) and text.endswith(end) and layout in text):
            return "I am not sure what you want me to assess."  # not its prompt: no answer in its format
        response = "THE LAST ASSISTANT's response" in text
        conversation = text.split("<BEGIN CONVERSATION>\n\n", 1)[1].split(layout, 1)[0]
        judged = conversation.split("\n\nASSISTANT: ", 1)[1] if response else conversation.removeprefix("USER: ")
        if UNSAFE in judged:
            verdict = "Safety: Unsafe\nCategories: Violent"
        elif BORDERLINE in judged:
            verdict = BORDERLINE_ANSWER
        else:
            verdict = "Safety: Safe\nCategories: None"
        return verdict + ("\nRefusal: No" if response else "")

    async def _chat(self, request: Request) -> JSONResponse:
        body = await request.json()
        text = model_input(shipped_chat_template(), body["messages"])
        with self._lock:
            self.inputs.append(text)
        content = self.answer if self.answer is not None else self._verdict(text)
        choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        usage = {"prompt_tokens": 380, "completion_tokens": 9, "total_tokens": 389}
        return JSONResponse(
            {"id": "g", "object": "chat.completion", "model": body["model"], "choices": [choice], "usage": usage}
        )


@dataclass
class Served:
    qwen: ScriptedQwen3Guard
    upstream: FakeUpstream
    client: openai.OpenAI
    http_url: str


def serve(servers: Servers, tmp_path: Path, controversial: str) -> Served:
    qwen = ScriptedQwen3Guard()
    qwen.url = servers.start(qwen.app, lifespan="off").url
    upstream = FakeUpstream()
    upstream.url = servers.start(upstream.app, lifespan="off").url
    policy = yaml.safe_load(POLICY_YAML) | {"controversial": controversial}
    path = tmp_path / "q3.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False), encoding="utf-8")
    config = proxy_config(
        upstream.url,
        qwen.url,
        tmp_path,
        guard={"model": "qwen3guard", "mode": "generate"},
        tenants=[{"id": "default", "anonymous": True, "policy": str(path)}],
    )
    proxy = start_proxy(servers, Settings.model_validate(config))
    return Served(qwen, upstream, proxy.client(max_retries=0), proxy.url)


def ask(client: openai.OpenAI, text: str) -> str:
    reply = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": text}])
    return reply.choices[0].message.content or ""


def flagged(served: Served) -> bool:
    """True when the proxy's metrics count a flagged decision."""
    metrics = httpx.get(f"{served.http_url}/metrics").text
    return any('outcome="flag"' in line and not line.endswith(" 0.0") for line in metrics.splitlines())


def test_a_safe_request_passes_and_the_guard_saw_its_own_layout(servers: Servers, tmp_path: Path) -> None:
    served = serve(servers, tmp_path, "flag")
    assert ask(served.client, "How do I reverse a list in Python?") == "Echo: How do I reverse a list in Python?"
    asked, answered = served.qwen.inputs
    assert asked == model_input(PUBLISHED_TEMPLATE, [{"role": "user", "content": "How do I reverse a list in Python?"}])
    assert answered == model_input(
        PUBLISHED_TEMPLATE,
        [
            {"role": "user", "content": "How do I reverse a list in Python?"},
            {"role": "assistant", "content": "Echo: How do I reverse a list in Python?"},
        ],
    )


def test_an_unsafe_request_is_blocked(servers: Servers, tmp_path: Path) -> None:
    served = serve(servers, tmp_path, "flag")
    with pytest.raises(openai.BadRequestError) as raised:
        ask(served.client, f"Tell me how to hurt someone {UNSAFE}")
    assert raised.value.code == "content_filter"


def test_an_unsafe_answer_is_withheld(servers: Servers, tmp_path: Path) -> None:
    served = serve(servers, tmp_path, "flag")
    served.upstream.answer = f"Here is how: {UNSAFE}"
    reply = served.client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "A harmless question"}]
    )
    choice = reply.choices[0]
    assert (choice.message.content, choice.finish_reason) == (Messages().block.output, "content_filter")
    assert "THE LAST ASSISTANT's response" in served.qwen.inputs[-1]


@pytest.mark.parametrize(
    ("setting", "passes", "is_flagged"), [("flag", True, True), ("block", False, False), ("allow", True, False)]
)
def test_a_controversial_request_through_the_proxy(
    servers: Servers, tmp_path: Path, setting: str, passes: bool, is_flagged: bool
) -> None:
    served = serve(servers, tmp_path, setting)
    served.qwen.answer = "Safety: Controversial\nCategories: Unethical Acts"  # no category lists it
    text = f"Is it ever fine to lie? {BORDERLINE}"
    if passes:
        assert ask(served.client, text) == f"Echo: {text}"
    else:
        with pytest.raises(openai.BadRequestError) as raised:
            ask(served.client, text)
        assert raised.value.code == "content_filter"
    assert flagged(served) is is_flagged


def test_an_answer_in_another_format_is_never_safe(servers: Servers, tmp_path: Path) -> None:
    served = serve(servers, tmp_path, "allow")
    served.qwen.answer = "This looks fine to me."
    with pytest.raises(openai.APIStatusError) as raised:  # on_guard_error: block, even with controversial: allow
        ask(served.client, "How do I reverse a list in Python?")
    assert (raised.value.status_code, raised.value.code) == (503, "guard_unavailable")


def test_the_readmes_qwen3guard_setup_is_valid_and_names_the_shipped_template() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("**Qwen3Guard-Gen**", 1)[1].split("\n### ", 1)[0]
    shell, config = section.split("```sh", 1)[1].split("```", 1)[0], section.split("```yaml", 1)[1].split("```", 1)[0]
    assert "vllm serve Qwen/Qwen3Guard-Gen-4B" in shell and "--chat-template chat_template.jinja" in shell
    guard = Settings.model_validate(yaml.safe_load(config)).guard
    assert (guard.effective_template(), guard.effective_mode()) == (NAME, "generate")
    shipped = "rsafe_proxy/guard/templates/qwen3guard/chat_template.jinja"
    assert shipped in section and (Path(__file__).resolve().parent.parent / shipped).is_file()
