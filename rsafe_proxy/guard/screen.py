"""The screener: one verdict for (tenant, policy, side, content), from the cache or the guard engine; long content
in segments, conversations as a whole."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from rsafe_proxy.errors import ContentTooLong
from rsafe_proxy.guard.cache import TTLCache, cache_key, chained_keys
from rsafe_proxy.guard.conversation import Turn, transcript
from rsafe_proxy.guard.engine import GuardCompleter, GuardContextExceeded, GuardEngineError, GuardOutput, Sampling
from rsafe_proxy.guard.families import Family, family, mode_problem
from rsafe_proxy.guard.normalise import normalise, normalised_bound
from rsafe_proxy.guard.policyview import PolicyView
from rsafe_proxy.guard.protocol import (
    Label,
    Reading,
    Side,
    load_system_template,
    load_template,
    named_categories,
    render_prompt,
)
from rsafe_proxy.guard.segments import halves, segment_count, segments

_TIMED_OUT = "guard timed out"  # the error of a verdict the guard did not give within guard.timeout_s


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
    controversial: bool = False  # the guard's middle verdict (Qwen3Guard), settled by the policy's `controversial`


@dataclass(frozen=True)
class ScreenSettings:
    """How the screener calls the engine and reads its output.

    Content longer than `segment_chars` is judged in segments overlapping by `overlap_chars`, all of them; a
    screen that would need more than `max_segments` guard calls is refused (ContentTooLong), never passed.
    At most `segments_in_flight` calls of one screen run at once, so one long text cannot take every slot of a
    shared guard.
    """

    mode: str = "generate"
    template: str | None = None
    score_threshold: float = 0.5  # one side's threshold when `score_thresholds` does not name it
    timeout_s: float = 60.0
    sampling: Sampling = field(default_factory=Sampling)
    segment_chars: int = 8000
    overlap_chars: int = 200
    max_segments: int = 64
    segments_in_flight: int = 4
    score_thresholds: tuple[tuple[Side, float], ...] = ()  # per side (a verdict head's calibrated ones)

    def threshold(self, policy: PolicyView, side: Side) -> float:
        """In score mode, P(unsafe) at or above this is unsafe: the policy's own for the side, else this
        screener's for the side, else `score_threshold`."""
        own = policy.guard.score_threshold
        if isinstance(own, float):
            return own
        guards = dict(self.score_thresholds).get(side, self.score_threshold)
        return guards if own is None else own.for_side(side, guards)

    def __post_init__(self) -> None:
        if self.segment_chars < 64 or not 0 <= self.overlap_chars < self.segment_chars // 2:
            raise ValueError("segment_chars must be at least 64 and overlap_chars less than half of it")
        if self.max_segments < 1 or self.segments_in_flight < 1:
            raise ValueError("max_segments and segments_in_flight must be at least 1")


Piece = tuple[str, str | None]  # (prompt, response) of one guard call


@dataclass
class _Allowance:
    """The guard calls one screen may still make beyond its segments (an engine may ask for smaller pieces)."""

    left: int

    def take(self, needed: int) -> None:
        if needed > self.left:
            raise ContentTooLong(
                "The content is too long to screen: it needs more guard work than one request may use."
            )
        self.left -= needed


def _strictness(policy: PolicyView, side: Side, verdict: Verdict) -> int:
    """How strict the decision on an unsafe verdict would be: its named categories' strictest action, or the
    policy's default action when it names none (as decide() reads it)."""
    actions = {category.id: category.action for category in policy.categories_for(side)}
    named = [actions[category] for category in verdict.categories if category in actions]
    return max(action.strictness for action in named) if named else policy.default_action.strictness


def combine(policy: PolicyView, side: Side, verdicts: Sequence[Verdict]) -> Verdict:
    """One verdict for content judged in pieces: unsafe if any piece is, else unknown if any is, else safe.

    The categories are those of the unsafe pieces whose decision is the strictest, so that a piece whose
    unsafe verdict names a mild (flag) category cannot soften another that names none (default action).
    """
    if len(verdicts) == 1:
        return verdicts[0]
    unsafe = [verdict for verdict in verdicts if verdict.label is Label.UNSAFE]
    unknown = [verdict for verdict in verdicts if verdict.label is Label.UNKNOWN]
    categories: tuple[str, ...] = ()
    if unsafe:
        label, shown = Label.UNSAFE, unsafe
        top = max(_strictness(policy, side, verdict) for verdict in unsafe)
        chosen = {c for v in unsafe if _strictness(policy, side, v) == top for c in v.categories}
        categories = tuple(category.id for category in policy.categories_for(side) if category.id in chosen)
    else:
        label, shown = (Label.UNKNOWN, unknown) if unknown else (Label.SAFE, list(verdicts))
    numbered = [(index, verdict) for index, verdict in enumerate(verdicts, 1) if verdict in shown]
    probabilities = [verdict.unsafe_probability for verdict in verdicts if verdict.unsafe_probability is not None]
    return Verdict(
        label=label,
        reasoning="\n\n".join(f"[segment {i} of {len(verdicts)}] {v.reasoning}" for i, v in numbered if v.reasoning),
        categories=categories,
        unsafe_probability=max(probabilities) if probabilities else None,
        prompt_tokens=sum(verdict.prompt_tokens for verdict in verdicts),
        completion_tokens=sum(verdict.completion_tokens for verdict in verdicts),
        cached_tokens=sum(verdict.cached_tokens for verdict in verdicts),
        cached=all(verdict.cached for verdict in verdicts),
        error=f"{unknown[0].error} ({len(unknown)} of {len(verdicts)} segments)" if label is Label.UNKNOWN else None,
        # an unsafe piece outweighs a controversial one; a safe whole is controversial if a piece was (allowed)
        controversial=all(v.controversial for v in unsafe) if unsafe else any(v.controversial for v in shown),
    )


class Screener:
    """Renders the guard prompt for a policy, calls the engine with a timeout, reads and caches the verdict.

    Everything cached is keyed by tenant: verdicts here, and the engine's prompt caches through a per-tenant
    `cache_salt` derived from a secret of this screener, so that no tenant can learn from timing what another
    sent. The guard reads a normalised view of every text (see normalise.py).
    """

    def __init__(
        self, engine: GuardCompleter, settings: ScreenSettings, cache: TTLCache[Verdict], secret: bytes | None = None
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.cache = cache
        self._secret = secrets.token_bytes(32) if secret is None else secret
        self._screens = itertools.count()  # names each screen's requester (with id(self): another screener's differ)

    def uncached(self) -> Screener:
        """This screener (its engine, settings and secret) with no verdict cache: what it judges is neither read
        from nor written to the cache traffic uses (the console's playground: a trial must not seed verdicts)."""
        return Screener(self.engine, self.settings, TTLCache(0, 0.0), self._secret)

    def family(self, policy: PolicyView) -> Family:
        """The template family this policy is rendered and read with (the configured one overrides it)."""
        return family(self.settings.template or policy.template)

    def render(self, policy: PolicyView, side: Side, prompt: str, response: str | None = None) -> str:
        """The guard prompt (the user message) for this policy and content."""
        chosen = self.family(policy)
        template = load_template(chosen.name, side)
        content = response if side is Side.OUTPUT else None
        return render_prompt(template, policy.category_lines(side), prompt, content, chosen.line)

    def render_system(self, policy: PolicyView, side: Side) -> str | None:
        """The system message for this policy, for families that put the policy there; else None."""
        chosen = self.family(policy)
        template = load_system_template(chosen.name)
        return None if template is None else render_prompt(template, policy.category_lines(side), "", None, chosen.line)

    def cache_salt(self, tenant: str) -> str:
        """The salt of `tenant`'s calls for the engine's prefix caches: stable for a tenant, unguessable and
        different across tenants (an HMAC of the tenant id under this screener's secret)."""
        return hmac.new(self._secret, tenant.encode(), hashlib.sha256).hexdigest()

    def _sampling(self, policy: PolicyView) -> Sampling:
        overrides = policy.guard
        return replace(
            self.settings.sampling,
            max_tokens=overrides.max_tokens or self.settings.sampling.max_tokens,
            temperature=self.settings.sampling.temperature if overrides.temperature is None else overrides.temperature,
            top_p=overrides.top_p or self.settings.sampling.top_p,
        )

    def _read(self, output: GuardOutput, policy: PolicyView, side: Side, content: str) -> Reading:
        if output.unsafe_probability is not None:
            threshold = self.settings.threshold(policy, side)
            unsafe = output.unsafe_probability >= threshold
            why = f"score mode: P(unsafe) = {output.unsafe_probability:.3f}, threshold {threshold:g}"
            return Reading(Label.UNSAFE if unsafe else Label.SAFE, why)
        ids = [category.id for category in policy.categories_for(side)]
        # an id the content itself holds may be read back from the guard quoting it: a user could pick the
        # mildest category that way, so only ids the content does not hold are attributed
        quoted = set(named_categories(content, ids))
        attributable = [known for known in ids if known not in quoted]
        chosen = self.family(policy)
        reading = chosen.read(output.text, attributable)
        if output.truncated and reading.label is Label.UNKNOWN:
            return Reading(Label.UNKNOWN, reading.reasoning + " [cut off at the reasoning budget]")
        if chosen.taxonomy:  # the guard named its own categories: the policy's that list them
            named = policy.guard_category_ids(side, reading.categories)
            reading = replace(reading, categories=tuple(known for known in named if known in attributable))
        if reading.controversial and policy.controversial == "allow":
            return replace(reading, label=Label.SAFE, categories=())
        return reading

    def _key(self, tenant: str, policy: PolicyView, side: Side, piece: Piece) -> str:
        prompt, response = piece
        return cache_key(
            "verdict", tenant, policy.version, side.value, self.settings.template or "", prompt, response or ""
        )

    def _conversation_keys(self, tenant: str, policy: PolicyView, turns: Sequence[Turn]) -> list[str]:
        head = ("conversation", tenant, policy.version, self.settings.template or "")
        return chained_keys(head, [(turn.role, normalise(turn.text)) for turn in turns])

    def admit(self, texts: Sequence[str]) -> None:
        """Refuse (ContentTooLong) texts too long to judge within max_segments, before anything normalises them:
        NFKC can make a text 18 times longer, and it runs on the event loop."""
        settings = self.settings
        most = settings.max_segments * (settings.segment_chars - settings.overlap_chars) + settings.overlap_chars
        if sum(len(text) for text in texts) > most or sum(normalised_bound(text) for text in texts) > most:
            raise ContentTooLong(
                f"The content is too long to screen: more than the {most} characters one request may have judged."
            )

    def known_turns(self, policy: PolicyView, turns: Sequence[Turn], *, tenant: str = "") -> int:
        """How many leading turns of this conversation were already judged safe as a whole (the rest are new);
        ContentTooLong for a conversation too long to judge."""
        self.admit([turn.text for turn in turns])
        keys = self._conversation_keys(tenant, policy, turns)
        for count in range(len(keys), 0, -1):
            known = self.cache.get(keys[count - 1])
            if known is not None and known.label is Label.SAFE:
                return count
        return 0

    async def screen_turns(self, policy: PolicyView, turns: Sequence[Turn], *, tenant: str = "") -> Verdict:
        """The verdict on a whole conversation (one role-labelled transcript), remembered when safe: the next
        request that extends it knows which of its turns are new."""
        verdict = await self.screen(policy, Side.INPUT, transcript(turns), tenant=tenant)
        if verdict.label is Label.SAFE and turns:
            # only the whole conversation: a safe verdict on it says nothing about any part of it on its own
            self.cache.put(self._conversation_keys(tenant, policy, turns)[-1], verdict)
        return verdict

    def _pieces(self, side: Side, prompt: str, response: str | None) -> list[Piece]:
        """The (prompt, response) of every guard call `content` needs: on the input side the prompt in
        segments; on the output side the response in segments, each after the end of the prompt it answers
        (context only: the prompt itself was judged on the input side)."""
        size, overlap, most = self.settings.segment_chars, self.settings.overlap_chars, self.settings.max_segments
        if side is Side.INPUT:
            judged, context = prompt, ""
        else:
            judged = response or ""
            room = size // 4
            context = prompt if len(prompt) <= room else "…" + prompt[len(prompt) - room + 1 :]
            size -= len(context)
        if (count := segment_count(len(judged), size, overlap)) > most:
            raise ContentTooLong(
                f"The content is too long to screen: it needs {count} guard segments of {size} characters, "
                f"more than the {most} one request may use."
            )
        if side is Side.INPUT:
            return [(segment, None) for segment in segments(judged, size, overlap)]
        return [(context, segment) for segment in segments(judged, size, overlap)]

    async def screen(
        self, policy: PolicyView, side: Side, prompt: str, response: str | None = None, *, tenant: str = ""
    ) -> Verdict:
        """The verdict on `prompt` (input side) or on `response` to `prompt` (output side), for `tenant`.

        Long content is judged in segments, all of them. Engine failures and timeouts give an UNKNOWN verdict
        with `error` set (unless a piece judged in time was unsafe); they are not cached. Content that needs
        more than `max_segments` guard calls raises ContentTooLong.
        """
        unreadable = mode_problem(self.settings.mode, self.family(policy))
        if unreadable is not None:  # a policy's own family (guard.template is checked with the config)
            return Verdict(Label.UNKNOWN, error=unreadable)
        if side is Side.INPUT:
            self.admit([prompt])
            pieces = self._pieces(side, normalise(prompt), None)
        else:  # the prompt is context: only its end is read, and only that end is normalised
            self.admit([response or ""])
            pieces = self._pieces(side, normalise(prompt[-self.settings.segment_chars :]), normalise(response or ""))
        started = time.perf_counter()
        call = _Call(
            policy,
            side,
            tenant,
            self.cache_salt(tenant),
            f"{id(self):x}-{next(self._screens)}",  # this screen's calls: one requester in the engine's fair queue
            asyncio.Semaphore(self.settings.segments_in_flight),
            _Allowance(self.settings.max_segments - len(pieces)),
        )
        if len(pieces) == 1:  # most content: judged in this task, without one of its own to wait for
            return replace(
                combine(policy, side, [await self._one(call, pieces[0])]), seconds=time.perf_counter() - started
            )
        tasks = [asyncio.ensure_future(self._piece(call, piece)) for piece in pieces]
        try:
            done, _ = await asyncio.wait(tasks, timeout=self.settings.timeout_s)
        finally:
            for task in tasks:  # a timeout, or a caller that gave up: queued engine work is dropped
                task.cancel()
        failures = [error for task in done if not task.cancelled() and (error := task.exception()) is not None]
        if failures:
            raise failures[0]  # ContentTooLong: the engine asked for more, smaller pieces than allowed
        timed_out = Verdict(Label.UNKNOWN, error=_TIMED_OUT)
        verdicts = [task.result() if task in done and not task.cancelled() else timed_out for task in tasks]
        return replace(combine(policy, side, verdicts), seconds=time.perf_counter() - started)

    async def _one(self, call: _Call, piece: Piece) -> Verdict:
        """The verdict on the only piece, within the screen's timeout (UNKNOWN past it)."""
        deadline = asyncio.timeout(self.settings.timeout_s)
        try:
            async with deadline:
                return await self._piece(call, piece)
        except TimeoutError:
            if not deadline.expired():  # an engine's own, not the screen's: raised as a piece's failure is
                raise
            return Verdict(Label.UNKNOWN, error=_TIMED_OUT)

    async def _piece(self, call: _Call, piece: Piece) -> Verdict:
        """The verdict on one piece: cached, judged, or (when the engine finds it too long) judged in halves."""
        key = self._key(call.tenant, call.policy, call.side, piece)
        hit = self.cache.get(key)
        if hit is not None:
            return replace(hit, cached=True, seconds=0.0)
        prompt, response = piece
        started = time.perf_counter()
        async with call.slots:
            output = await self._complete(call, piece)
        if isinstance(output, GuardContextExceeded):
            return await self._halved(call, piece, output)
        if isinstance(output, GuardEngineError):
            return Verdict(Label.UNKNOWN, seconds=time.perf_counter() - started, error=str(output))
        reading = self._read(output, call.policy, call.side, f"{prompt}\n{response or ''}")
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
            controversial=reading.controversial,
        )
        if verdict.label is not Label.UNKNOWN:
            self.cache.put(key, verdict)
        return verdict

    async def _complete(self, call: _Call, piece: Piece) -> GuardOutput | GuardEngineError:
        prompt, response = piece
        try:
            return await self.engine.complete(
                self.render(call.policy, call.side, prompt, response),
                self._sampling(call.policy),
                system=self.render_system(call.policy, call.side),
                cache_salt=call.salt,
                requester=call.requester,
            )
        except GuardEngineError as error:
            return error

    async def _halved(self, call: _Call, piece: Piece, exceeded: GuardContextExceeded) -> Verdict:
        """A piece the engine could not take, judged in two overlapping halves (each halved again if need be); on
        the output side the prompt's tail it is judged after (context only) shrinks too, or it might never fit."""
        prompt, response = piece
        overlap = self.settings.overlap_chars
        judged, context = (prompt, "") if call.side is Side.INPUT else (response or "", prompt)
        split, shrink = len(judged) >= 4 * overlap + 64, len(context) > 2 * overlap
        if not (split or shrink):  # not even the policy and a short text fit: a broken guard, not long content
            return Verdict(Label.UNKNOWN, error=f"the guard model's context is too small for the policy: {exceeded}")
        call.allowance.take(1)
        if shrink:
            context = "…" + context[len(context) // 2 + 1 :]
        parts = halves(judged, overlap) if split else [judged]
        pieces: list[Piece] = [(part, None) if call.side is Side.INPUT else (context, part) for part in parts]
        tasks = [asyncio.ensure_future(self._piece(call, one)) for one in pieces]
        try:
            verdicts = await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # one half refused (ContentTooLong): the other stops too
                task.cancel()
        return combine(call.policy, call.side, verdicts)


@dataclass(frozen=True)
class _Call:
    """What every guard call of one screen shares."""

    policy: PolicyView
    side: Side
    tenant: str
    salt: str
    requester: str
    slots: asyncio.Semaphore
    allowance: _Allowance
