"""The transformers engine, run for real on tiny random-weight Llamas built here (and once on the embedded model)."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from rsafe_proxy.guard import embedded
from rsafe_proxy.guard.engine import GuardEngine, GuardEngineError, GuardOutput, Sampling, load_engine
from rsafe_proxy.guard.engines.transformers import TransformersEngine
from rsafe_proxy.guard.protocol import CategoryLine, Side, load_template, render_prompt
from tests.tiny_models import (
    GREEDY,
    PREFIX,
    PROMPTS,
    build_tiny_model,
    engine_outputs,
    forward_batch_sizes,
    log_odds,
    run,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One token each for "safe" and "unsafe"."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), vocab_size=300)


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No merges: "safe" is 4 tokens and "unsafe" 6, so scoring must follow them through the KV cache."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bytes"), vocab_size=260)


@pytest.fixture(scope="module")
def stuck(tmp_path_factory: pytest.TempPathFactory, tiny: Path) -> Path:
    """A zeroed final norm makes every logit 0, so greedy decoding repeats token 0 (`<unk>`, not a stop)."""
    folder = Path(shutil.copytree(tiny, tmp_path_factory.mktemp("stuck") / "model"))
    weights = load_file(folder / "model.safetensors")
    weights["model.norm.weight"].zero_()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def manual_unsafe_probability(folder: Path, prompt: str) -> float:
    """P(unsafe) / (P(safe) + P(unsafe)) from whole-sequence forward passes: no padding, cache or batching."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    assert isinstance(text, str)
    head = tokenizer.encode(text + PREFIX, add_special_tokens=False)
    logprobs = []
    for word in ("safe", "unsafe"):
        ids = tokenizer.encode(text + PREFIX + word, add_special_tokens=False)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        logprobs.append(sum(float(logits[i - 1, ids[i]]) for i in range(len(head), len(ids))))
    return float(torch.sigmoid(torch.tensor(logprobs[1] - logprobs[0])))


def test_the_fixtures_split_the_verdicts_as_claimed(tiny: Path, tiny_bytes: Path) -> None:
    for folder, lengths in ((tiny, [1, 1]), (tiny_bytes, [4, 6])):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        head = len(tokenizer.encode(PREFIX, add_special_tokens=False))
        split = [len(tokenizer.encode(PREFIX + word, add_special_tokens=False)) - head for word in ("safe", "unsafe")]
        assert split == lengths


def test_a_score_prefix_that_merges_with_the_verdict_is_refused(tiny: Path) -> None:
    with pytest.raises(GuardEngineError, match="merges the end of score_prefix"):
        engine_outputs(tiny, PROMPTS[:1], score_prefix="\\boxed{un")  # "un" + "safe" tokenizes as "unsafe"


@pytest.mark.parametrize("fixture", ["tiny", "tiny_bytes"])
def test_score_equals_a_manual_computation(fixture: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(fixture)
    [output] = engine_outputs(folder, [PROMPTS[1]])
    expected = manual_unsafe_probability(folder, PROMPTS[1])
    assert log_odds(output.unsafe_probability) == pytest.approx(log_odds(expected), abs=1e-3)
    assert output.text == ""
    assert output.prompt_tokens > 10


@pytest.mark.parametrize("fixture", ["tiny", "tiny_bytes"])
def test_batched_scores_equal_single_ones(fixture: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(fixture)
    with forward_batch_sizes() as sizes:
        batched = engine_outputs(folder, PROMPTS)
    single = [engine_outputs(folder, [prompt])[0] for prompt in PROMPTS]
    assert max(sizes) == len(PROMPTS)  # they really ran as one left-padded batch
    for one, many in zip(single, batched, strict=True):
        assert log_odds(many.unsafe_probability) == pytest.approx(log_odds(one.unsafe_probability), abs=1e-3)
        assert many.prompt_tokens == one.prompt_tokens
    spread = {round(log_odds(output.unsafe_probability), 1) for output in single}
    assert len(spread) == len(PROMPTS)  # the prompts matter, so a mixed-up row would show


def test_batches_never_exceed_max_batch(tiny: Path) -> None:
    with forward_batch_sizes() as sizes:
        outputs = engine_outputs(tiny, PROMPTS, max_batch=2)
    assert max(sizes) == 2
    assert all(output.unsafe_probability is not None for output in outputs)


def test_default_bfloat16_scores_are_close(tiny: Path) -> None:
    async def main() -> GuardOutput:
        engine = TransformersEngine(model=str(tiny), threads=1)
        try:
            return await engine.complete(PROMPTS[0], GREEDY)
        finally:
            await engine.aclose()

    output = run(main)
    assert output.unsafe_probability == pytest.approx(manual_unsafe_probability(tiny, PROMPTS[0]), abs=0.05)


def test_generate_matches_greedy_generation(tiny: Path) -> None:
    outputs = engine_outputs(tiny, PROMPTS[:3], mode="generate")
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    for prompt, output in zip(PROMPTS[:3], outputs, strict=True):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        assert isinstance(text, str)
        ids = tokenizer.encode(text, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=3
            )
        new = out[0, len(ids) :].tolist()
        assert output.text == tokenizer.decode(new, skip_special_tokens=True)
        assert output.text
        assert output.prompt_tokens == len(ids)
        assert output.completion_tokens == len(new)
        assert output.truncated == (2 not in new)
        assert output.unsafe_probability is None


def test_generate_reports_truncation(stuck: Path) -> None:
    [output] = engine_outputs(stuck, [PROMPTS[0]], mode="generate", sampling=Sampling(temperature=0.0, max_tokens=5))
    assert (output.completion_tokens, output.truncated) == (5, True)


def test_generate_stops_at_a_stop_token(stuck: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(stuck, tmp_path / "stops-at-0"))
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.generation_config.eos_token_id = [0, 2]
    model.generation_config.save_pretrained(folder)
    [output] = engine_outputs(folder, [PROMPTS[0]], mode="generate", sampling=Sampling(temperature=0.0, max_tokens=5))
    assert (output.text, output.completion_tokens, output.truncated) == ("", 1, False)


def test_sampling_generates_within_max_tokens(tiny: Path) -> None:
    outputs = engine_outputs(tiny, PROMPTS[:2], mode="generate", sampling=Sampling(temperature=0.9, max_tokens=8))
    assert all(0 < output.completion_tokens <= 8 for output in outputs)


def test_a_failing_prompt_fails_alone(tiny: Path) -> None:
    async def main() -> list[GuardOutput | BaseException]:
        engine = TransformersEngine(model=str(tiny), dtype="float32")
        await engine.start()
        try:
            jobs = (engine.complete(prompt, GREEDY) for prompt in ["REFUSE", *PROMPTS[:2]])
            return list(await asyncio.gather(*jobs, return_exceptions=True))
        finally:
            await engine.aclose()

    refused, *good = run(main)
    assert isinstance(refused, GuardEngineError)
    assert "refused" in str(refused)
    expected = engine_outputs(tiny, PROMPTS[:2])
    assert [o.unsafe_probability for o in good if isinstance(o, GuardOutput)] == pytest.approx(
        [o.unsafe_probability for o in expected], abs=1e-5
    )


def test_a_model_that_cannot_load_raises_guard_engine_error(tmp_path: Path) -> None:
    async def main() -> bool:
        engine = TransformersEngine(model=str(tmp_path / "missing"))
        with pytest.raises(GuardEngineError, match="could not load guard model"):
            await engine.complete("hi", GREEDY)
        ready = await engine.ready()
        await engine.aclose()
        return ready

    assert run(main) is False


def test_a_tokenizer_without_chat_template_is_refused(tmp_path: Path) -> None:
    folder = build_tiny_model(tmp_path, vocab_size=300, template=None)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert not tokenizer.chat_template

    async def main() -> None:
        engine = TransformersEngine(model=str(folder))
        try:
            await engine.start()
        finally:
            await engine.aclose()

    with pytest.raises(GuardEngineError, match="no chat template"):
        run(main)


@pytest.mark.parametrize(
    ("option", "value"), [("mode", "chat"), ("dtype", "int8"), ("max_batch", 0), ("prefix_cache", -1)]
)
def test_bad_options_are_refused_at_construction(option: str, value: Any) -> None:
    with pytest.raises(ValueError, match=option):
        TransformersEngine(**{option: value})


def test_the_event_loop_keeps_running_during_inference(tiny: Path) -> None:
    workers: list[int] = []

    def slow_forward(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if isinstance(module, LlamaForCausalLM):
            workers.append(threading.get_ident())
            time.sleep(0.3)  # blocks whichever thread runs the model

    async def main() -> int:
        engine = TransformersEngine(model=str(tiny), dtype="float32")
        await engine.start()
        ticks = 0
        job = asyncio.ensure_future(engine.complete(PROMPTS[0], GREEDY))
        while not job.done():
            ticks += 1
            await asyncio.sleep(0.01)
        await job
        await engine.aclose()
        return ticks

    handle = torch.nn.modules.module.register_module_forward_pre_hook(slow_forward)
    try:
        ticks = run(main)
    finally:
        handle.remove()
    assert ticks >= 10
    assert workers
    assert threading.get_ident() not in workers


def test_lifecycle_through_the_registry(tiny: Path) -> None:
    async def main() -> tuple[bool, bool, bool]:
        engine = load_engine("transformers", {"model": str(tiny), "dtype": "float32"})
        assert isinstance(engine, GuardEngine)
        assert engine.name == "transformers"
        before = await engine.ready()
        await engine.complete(PROMPTS[0], GREEDY)  # loads lazily
        during = await engine.ready()
        await engine.aclose()
        with pytest.raises(GuardEngineError, match="closed"):
            await engine.complete(PROMPTS[0], GREEDY)
        return before, during, await engine.ready()

    assert run(main) == (False, True, False)


def test_aclose_fails_waiting_requests(tiny: Path) -> None:
    async def main() -> list[GuardOutput | BaseException]:
        engine = TransformersEngine(model=str(tiny), dtype="float32", max_batch=1)
        await engine.start()
        jobs = [asyncio.ensure_future(engine.complete(prompt, GREEDY)) for prompt in PROMPTS]
        await asyncio.sleep(0)  # queued; at most the first is running
        await engine.aclose()
        return list(await asyncio.gather(*jobs, return_exceptions=True))

    outcomes = run(main)
    assert any(isinstance(outcome, GuardEngineError) for outcome in outcomes)
    assert all(isinstance(outcome, GuardOutput | GuardEngineError) for outcome in outcomes)


def test_a_lora_adapter_is_merged(tiny: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny)
    torch.manual_seed(1)  # init_lora_weights=False: random B, so the adapter changes the output
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(str(tmp_path / "adapter"))
    merged = AutoModelForCausalLM.from_pretrained(tiny)
    PeftModel.from_pretrained(merged, str(tmp_path / "adapter")).merge_and_unload().save_pretrained(tmp_path / "merged")
    AutoTokenizer.from_pretrained(tiny).save_pretrained(tmp_path / "merged")

    frozen: list[bool] = []

    def record(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if isinstance(module, LlamaForCausalLM):  # PEFT leaves merged weights frozen; batched matmuls then copy
            frozen.append(not all(parameter.requires_grad for parameter in module.parameters()))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        [adapted] = engine_outputs(tiny, [PROMPTS[1]], adapter=str(tmp_path / "adapter"))
    finally:
        handle.remove()
    [plain] = engine_outputs(tiny, [PROMPTS[1]], adapter="auto")  # "auto" means none for a local model
    assert adapted.unsafe_probability == pytest.approx(manual_unsafe_probability(tmp_path / "merged", PROMPTS[1]))
    assert adapted.unsafe_probability != pytest.approx(plain.unsafe_probability)
    assert frozen == [False]


def test_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RSAFE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.cache_root() == tmp_path / "xdg" / "rsafe-proxy"
    monkeypatch.setenv("RSAFE_CACHE_DIR", str(tmp_path / "explicit"))
    assert embedded.cache_root() == tmp_path / "explicit"


@pytest.mark.slow
def test_the_embedded_model_scores_rsafe_prompts() -> None:
    categories = [
        CategoryLine("U1", "Violent Crimes", "content that enables or encourages violence"),
        CategoryLine("U2", "Indiscriminate Weapons", "chemical, biological, nuclear, explosive weapons"),
    ]
    prompts = [
        render_prompt(load_template("rsafe", Side.INPUT), categories, "Give me exact steps to build a pipe bomb."),
        render_prompt(load_template("rsafe", Side.INPUT), categories, "What is a good recipe for banana bread?"),
        render_prompt(
            load_template("rsafe", Side.OUTPUT), categories, "How do I bake bread?", "Mix flour, water and yeast."
        ),
    ]
    folder = embedded.embedded_model_dir()
    assert AutoTokenizer.from_pretrained(folder).chat_template == embedded.CHAT_TEMPLATE

    async def main() -> list[GuardOutput]:
        engine = TransformersEngine()  # the embedded model, bf16
        try:
            return list(await asyncio.gather(*(engine.complete(prompt, Sampling()) for prompt in prompts)))
        finally:
            await engine.aclose()

    for output in run(main):
        assert output.unsafe_probability is not None
        assert 0.0 <= output.unsafe_probability <= 1.0
        assert output.prompt_tokens > 100


def test_the_embedded_folder_is_built_once_and_atomically(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[Path] = []

    def convert(out_dir: Path) -> None:  # stands in for the minute-long GGUF conversion
        calls.append(out_dir)
        time.sleep(0.2)
        (out_dir / "config.json").write_text("{}", encoding="utf-8")

    monkeypatch.setattr(embedded, "_convert", convert)

    async def main() -> list[Path]:
        return list(await asyncio.gather(*(asyncio.to_thread(embedded.embedded_model_dir, tmp_path) for _ in range(3))))

    folders = run(main)
    assert len(calls) == 1
    assert len(set(folders)) == 1
    assert (folders[0] / "config.json").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([folders[0].name, f"{folders[0].name}.lock"])


def test_a_failed_conversion_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def convert(out_dir: Path) -> None:
        (out_dir / "half-written").write_text("", encoding="utf-8")
        raise OSError("disk full")

    monkeypatch.setattr(embedded, "_convert", convert)
    with pytest.raises(OSError, match="disk full"):
        embedded.embedded_model_dir(tmp_path)
    assert [path.suffix for path in tmp_path.iterdir()] == [".lock"]
