"""The in-process guard engine: a causal LM run by transformers on one worker thread, with batching and
prefix reuse.

torch and transformers are imported when the model loads, so configuring this engine costs nothing. All model
work runs on a single dedicated thread; the event loop only queues requests and collects results. Requests
that arrive while a batch runs are gathered (up to `max_batch`, and `max_batch_chars` of prompt) and run together,
left-padded. They are taken fairly (fair.py): tenants in turn, and each tenant's requesters in turn, so one long
text judged in many segments cannot hold up every other request; a request whose caller gave up is dropped.

Prefix reuse: the policy part of a guard prompt is the same for every screen of a tenant. The engine learns
such shared leading tokens (see prefix.py), computes their key/value cache once, and then reads only the rest
of each prompt, so a verdict costs roughly the content's tokens rather than the policy's. Stored prefixes are
salted per tenant (`cache_salt`): a tenant never reads another's, so timing tells it nothing of their prompts.

A prompt longer than the model's context (its `max_position_embeddings`, with room for the answer) is refused
with GuardContextExceeded, which the screener answers by judging the content in smaller pieces.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Self

from rsafe_proxy.guard.embedded import adapter_folder, head_folder, model_path, quietly
from rsafe_proxy.guard.engine import (
    EMBEDDED_MODEL,
    EngineInfo,
    EngineSettings,
    GuardEngineError,
    GuardOutput,
    Sampling,
    chat_messages,
)
from rsafe_proxy.guard.engines.fair import FairQueue
from rsafe_proxy.guard.engines.model_runner import ModelRunner
from rsafe_proxy.guard.engines.prefix import PrefixStore
from rsafe_proxy.guard.head import HeadInfo, VerdictHead
from rsafe_proxy.guard.protocol import Side

_MODES = ("score", "generate")
_DTYPES = ("bfloat16", "float16", "float32")


def head_thresholds(model: str, adapter: str | None) -> tuple[tuple[Side, float], ...]:
    """The per-side thresholds of the verdict head beside this model and adapter (none without a head). Read
    from its small JSON file, with no model loaded."""
    folder = head_folder(model, adapter)
    info = HeadInfo.read(folder) if folder is not None else None
    return () if info is None else tuple((Side(side), value) for side, value in info.thresholds.items())


@dataclass(frozen=True)
class _Request:
    messages: list[dict[str, str]]
    sampling: Sampling
    salt: str
    future: asyncio.Future[GuardOutput]

    @property
    def chars(self) -> int:
        return sum(len(message["content"]) for message in self.messages)

    @property
    def live(self) -> bool:
        return not self.future.done()  # a caller that gave up (timed out) cancelled it


class TransformersEngine:
    """Runs the guard model in process; `model="embedded"` is the packaged Gemma 3 270M.

    `mode="score"` reads P(unsafe) / (P(safe) + P(unsafe)) right after `score_prefix` in one forward pass, or,
    where the adapter (or model) folder holds a verdict head (head.py), the head's P(unsafe) from the same pass;
    `mode="generate"` samples the model's own reasoning and answer. `prefix_cache` is how many tokens of shared
    prompt prefixes (policies) keep their key/value cache, in all; 0 turns prefix reuse off. `max_batch_chars`
    bounds the prompt characters of one batch (at least one prompt runs), so that a request arriving while a
    batch runs waits for a bounded time.
    """

    name = "transformers"

    def __init__(
        self,
        *,
        model: str = EMBEDDED_MODEL,
        adapter: str | None = "auto",
        mode: str = "score",
        device: str = "cpu",
        dtype: str = "bfloat16",
        threads: int | None = None,
        score_prefix: str = "<think>\n</think>\n\\boxed{",
        max_batch: int = 8,
        max_batch_chars: int = 24_000,
        prefix_cache: int = 8192,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, not {mode!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, not {dtype!r}")
        if max_batch < 1 or max_batch_chars < 1 or (threads is not None and threads < 1):
            raise ValueError("max_batch, max_batch_chars and threads must be at least 1")
        if prefix_cache < 0:
            raise ValueError("prefix_cache must be 0 (off) or more")
        self._options = (model, adapter, device, dtype, threads)
        self.info = EngineInfo(
            "transformers", model, loads_model=True, score_thresholds=head_thresholds(model, adapter)
        )
        self._prefix_cache = prefix_cache
        self._mode = mode
        self._score_prefix = score_prefix
        self._max_batch = max_batch
        self._max_batch_chars = max_batch_chars
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rsafe-guard")
        self._queue = FairQueue[_Request]()
        self._load_lock = asyncio.Lock()
        self._runner: ModelRunner | None = None
        self._server: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> Self:
        """The engine `guard.options` configure (model, adapter, device, dtype, threads, batching), in the guard's
        mode."""
        return cls(**{**settings.options, "mode": settings.mode})

    async def start(self) -> None:
        """Load the model (off the event loop) unless it is loaded; raise GuardEngineError if it cannot be."""
        async with self._load_lock:
            if self._closed:
                raise GuardEngineError("the transformers engine is closed")
            if self._runner is None:
                loop = asyncio.get_running_loop()
                try:
                    self._runner = await loop.run_in_executor(self._executor, quietly, self._load)
                except Exception as exc:
                    raise GuardEngineError(f"could not load guard model {self._options[0]!r}: {exc}") from exc
            if self._server is None:
                self._server = asyncio.create_task(self._serve(self._runner), name="rsafe-guard-batcher")

    async def complete(
        self, prompt: str, sampling: Sampling, system: str | None = None, *, cache_salt: str = "", requester: str = ""
    ) -> GuardOutput:
        """Queue `prompt` for a batch (fairly, under its tenant's salt and its requester) and wait for its output;
        cancelling the wait drops it from the queue."""
        await self.start()
        future = asyncio.get_running_loop().create_future()
        request = _Request(chat_messages(prompt, system), sampling, cache_salt, future)
        self._queue.put(cache_salt, requester, request)
        return await request.future

    async def ready(self) -> bool:
        """True once the model is loaded and the engine is open."""
        return self._runner is not None and not self._closed

    async def aclose(self) -> None:
        """Stop the batcher, fail queued requests, stop the worker thread and drop the model."""
        self._closed = True
        if self._server is not None:
            self._server.cancel()
            await asyncio.gather(self._server, return_exceptions=True)
        for request in self._queue.drain():
            _fail(request, GuardEngineError("the transformers engine is closed"))
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        self._runner = None

    async def _serve(self, runner: ModelRunner) -> None:
        loop = asyncio.get_running_loop()
        while True:
            live = await self._queue.take(
                self._max_batch, self._max_batch_chars, size=lambda request: request.chars, live=_live
            )
            try:
                jobs = [(request.messages, request.sampling, request.salt) for request in live]
                outcomes = await loop.run_in_executor(self._executor, runner.run, jobs)
            except asyncio.CancelledError:
                for request in live:
                    _fail(request, GuardEngineError("the transformers engine is closed"))
                raise
            except Exception as exc:  # the executor itself failed; runner.run does not raise
                outcomes = [GuardEngineError(f"guard model failed: {exc}")] * len(live)
            for request, outcome in zip(live, outcomes, strict=True):
                if isinstance(outcome, GuardEngineError):
                    _fail(request, outcome)
                elif not request.future.done():
                    request.future.set_result(outcome)

    def _load(self) -> ModelRunner:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_name, adapter, device, dtype, threads = self._options
        if threads is not None:
            torch.set_num_threads(threads)
        path = model_path(model_name)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if not tokenizer.chat_template:
            raise GuardEngineError(f"{path} has no chat template (set `chat_template` in its tokenizer config)")
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=getattr(torch, dtype), device_map=device, local_files_only=True
        )
        adapter_path = adapter_folder(model_name, adapter)
        if adapter_path is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_path)).merge_and_unload()
        folder = head_folder(model_name, adapter)
        head = VerdictHead.load(folder) if folder is not None else None
        model.train(False)  # no dropout at inference
        # torch.matmul turns the batched last-position product (B, 1, H) @ (H, vocab) into one matrix multiply
        # only if the weight requires grad or the sliced input is contiguous (it is not); otherwise it copies
        # the whole output matrix once per row (1.25 GB and 3x slower at batch 4 for Gemma). PEFT's merge turns
        # grad off. Under inference_mode requiring grad costs nothing: no graph is recorded.
        for parameter in model.parameters():
            parameter.requires_grad_(parameter.is_floating_point())
        prefixes = PrefixStore[Any](self._prefix_cache) if self._prefix_cache else None
        return ModelRunner(model, tokenizer, self._mode, self._score_prefix, device, prefixes, head)


def _live(request: _Request) -> bool:
    return request.live


def _fail(request: _Request, error: GuardEngineError) -> None:
    if not request.future.done():
        request.future.set_exception(error)
