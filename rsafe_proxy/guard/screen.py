"""The screener: one verdict for (policy, side, content), from the cache or the guard engine."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace

from rsafe_proxy.guard.cache import TTLCache, cache_key
from rsafe_proxy.guard.engine import GuardEngine, GuardEngineError, GuardOutput, Sampling
from rsafe_proxy.guard.families import Family, family, mode_problem
from rsafe_proxy.guard.protocol import (
    Label,
    Reading,
    Side,
    load_system_template,
    load_template,
    named_categories,
    render_prompt,
)
from rsafe_proxy.policy.schema import Policy


@dataclass(frozen=True)
class Verdict:
    """The guard's judgement of one piece of content, with what it cost."""

    label: Label
    reasoning: str = ""
    categories: tuple[str, ...] = ()
    unsafe_probability: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    seconds: float = 0.0
    cached: bool = False
    error: str | None = None


@dataclass(frozen=True)
class ScreenSettings:
    """How the screener calls the engine and reads its output."""

    mode: str = "generate"
    template: str | None = None
    score_threshold: float = 0.5
    timeout_s: float = 60.0
    sampling: Sampling = field(default_factory=Sampling)


class Screener:
    """Renders the guard prompt for a policy, calls the engine with a timeout, reads and caches the verdict."""

    def __init__(self, engine: GuardEngine, settings: ScreenSettings, cache: TTLCache[Verdict]) -> None:
        self.engine = engine
        self.settings = settings
        self.cache = cache

    def family(self, policy: Policy) -> Family:
        """The template family this policy is rendered and read with (the configured one overrides it)."""
        return family(self.settings.template or policy.template)

    def render(self, policy: Policy, side: Side, prompt: str, response: str | None = None) -> str:
        """The guard prompt (the user message) for this policy and content."""
        chosen = self.family(policy)
        template = load_template(chosen.name, side)
        content = response if side is Side.OUTPUT else None
        return render_prompt(template, policy.category_lines(side), prompt, content, chosen.line)

    def render_system(self, policy: Policy, side: Side) -> str | None:
        """The system message for this policy, for families that put the policy there; else None."""
        chosen = self.family(policy)
        template = load_system_template(chosen.name)
        return None if template is None else render_prompt(template, policy.category_lines(side), "", None, chosen.line)

    def _sampling(self, policy: Policy) -> Sampling:
        overrides = policy.guard
        return replace(
            self.settings.sampling,
            max_tokens=overrides.max_tokens or self.settings.sampling.max_tokens,
            temperature=self.settings.sampling.temperature if overrides.temperature is None else overrides.temperature,
            top_p=overrides.top_p or self.settings.sampling.top_p,
        )

    def _read(self, output: GuardOutput, policy: Policy, side: Side, content: str) -> Reading:
        if output.unsafe_probability is not None:
            unsafe = output.unsafe_probability >= self.settings.score_threshold
            why = f"score mode: P(unsafe) = {output.unsafe_probability:.3f}, threshold {self.settings.score_threshold}"
            return Reading(Label.UNSAFE if unsafe else Label.SAFE, why)
        ids = [category.id for category in policy.categories_for(side)]
        # an id the content itself holds may be read back from the guard quoting it: a user could pick the
        # mildest category that way, so only ids the content does not hold are attributed
        quoted = set(named_categories(content, ids))
        reading = self.family(policy).read(output.text, [known for known in ids if known not in quoted])
        if output.truncated and reading.label is Label.UNKNOWN:
            return Reading(Label.UNKNOWN, reading.reasoning + " [cut off at the reasoning budget]")
        return reading

    def _key(self, policy: Policy, side: Side, prompt: str, response: str | None) -> str:
        return cache_key(policy.version, side.value, self.settings.template or "", prompt, response or "")

    def known(self, policy: Policy, side: Side, prompt: str, response: str | None = None) -> Verdict | None:
        """The cached verdict for this content, if any (earlier turns of a conversation are not re-screened)."""
        return self.cache.get(self._key(policy, side, prompt, response))

    def remember(self, policy: Policy, side: Side, prompt: str, verdict: Verdict) -> None:
        """Cache `verdict` for `prompt` too (a turn judged safe as part of a larger screen)."""
        # only safe: an unsafe verdict on several turns says nothing about each one, and cached it would
        # block every later request that holds an innocent turn of that conversation ("hello")
        if verdict.label is Label.SAFE:
            self.cache.put(self._key(policy, side, prompt, None), verdict)

    async def screen(self, policy: Policy, side: Side, prompt: str, response: str | None = None) -> Verdict:
        """The verdict on `prompt` (input side) or on `response` to `prompt` (output side).

        Engine failures and timeouts give an UNKNOWN verdict with `error` set; they are not cached.
        """
        key = self._key(policy, side, prompt, response)
        hit = self.cache.get(key)
        if hit is not None:
            return replace(hit, cached=True, seconds=0.0)
        started = time.perf_counter()
        unreadable = mode_problem(self.settings.mode, self.family(policy))
        if unreadable is not None:  # a policy's own family (guard.template is checked with the config)
            return Verdict(Label.UNKNOWN, error=unreadable)
        try:
            output = await asyncio.wait_for(
                self.engine.complete(
                    self.render(policy, side, prompt, response),
                    self._sampling(policy),
                    system=self.render_system(policy, side),
                ),
                timeout=self.settings.timeout_s,
            )
        except TimeoutError:
            return Verdict(Label.UNKNOWN, seconds=time.perf_counter() - started, error="guard timed out")
        except GuardEngineError as error:
            return Verdict(Label.UNKNOWN, seconds=time.perf_counter() - started, error=str(error))
        reading = self._read(output, policy, side, f"{prompt}\n{response or ''}")
        verdict = Verdict(
            label=reading.label,
            reasoning=reading.reasoning,
            categories=reading.categories,
            unsafe_probability=output.unsafe_probability,
            prompt_tokens=output.prompt_tokens,
            completion_tokens=output.completion_tokens,
            cached_tokens=output.cached_tokens,
            seconds=time.perf_counter() - started,
            error=None if reading.label is not Label.UNKNOWN else "the guard's output held no readable verdict",
        )
        if verdict.label is not Label.UNKNOWN:
            self.cache.put(key, verdict)
        return verdict
