"""The transformers engine's model side (transformers.py queues the calls): the loaded model and tokenizer, used
only on the engine's worker thread. Calls are run in batches, left-padded; a stored prefix's key/value cache is
read instead of computed again (prefix.py); a verdict is scored in one forward pass (or read by the verdict head)
or generated.

torch and transformers are imported where the model is loaded and run: importing this module loads neither.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rsafe_proxy.guard.engine import GuardContextExceeded, GuardEngineError, GuardOutput, Sampling
from rsafe_proxy.guard.engines.prefix import PrefixStore, Tokens
from rsafe_proxy.guard.head import VerdictHead

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Chat templates end a turn with these; base-model generation configs often know only the plain EOS.
_TURN_ENDS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>")

Job = tuple[list[dict[str, str]], Sampling, str]  # messages, sampling, cache salt


@dataclass
class _Group:
    """Rows that run in one forward pass, and the stored prefix they share (none: `prefix` is empty); `computed`
    of the prefix's tokens were computed for this pass (the first row reports only the rest as cached)."""

    rows: list[int]
    prefix: Tokens = ()
    cache: Any = None
    computed: int = 0

    def cached(self, position: int) -> int:
        """The tokens that the row at `position` of this group read from a cache."""
        return len(self.prefix) - (self.computed if position == 0 else 0)


Conversation = tuple[list[dict[str, str]], str]  # messages, cache salt


class ModelRunner:
    """The loaded model and tokenizer; used only on the worker thread."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        mode: str,
        prefix: str,
        device: str,
        prefixes: PrefixStore[Any] | None,
        head: VerdictHead | None = None,
    ) -> None:
        self.model = model
        self.head = head
        self.tokenizer = tokenizer
        self.mode = mode
        self.prefix = prefix
        self.device = device
        self.prefixes = prefixes
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if isinstance(pad, int) else 0
        # transformers 5.x renamed the `past_key_values` argument and output to `cache`
        self.cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.verdicts = [_continuation(tokenizer, prefix, word) for word in ("safe", "unsafe")]
        configured = model.generation_config.eos_token_id
        stops = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
        vocab = tokenizer.get_vocab()
        stops.update(vocab[token] for token in (tokenizer.eos_token, *_TURN_ENDS) if token in vocab)
        self.stops = sorted(int(stop) for stop in stops)
        text_config = model.config.get_text_config()
        window = getattr(text_config, "sliding_window", None)
        self.window = window if isinstance(window, int) and window > 0 else None
        context = getattr(text_config, "max_position_embeddings", None)
        self.context = context if isinstance(context, int) and context > 0 else None

    def run(self, jobs: list[Job]) -> list[GuardOutput | GuardEngineError]:
        """Outputs in job order; a failed batch is retried one by one, so one bad prompt fails alone."""
        groups: dict[Sampling | None, list[int]] = {}
        for index, (_, sampling, _) in enumerate(jobs):  # score mode ignores sampling; generate batches alike ones
            groups.setdefault(sampling if self.mode == "generate" else None, []).append(index)
        outcomes: dict[int, GuardOutput | GuardEngineError] = {}
        for key, indexes in groups.items():
            chosen = [(jobs[i][0], jobs[i][2]) for i in indexes]
            outcomes.update(zip(indexes, self._attempt(chosen, key), strict=True))
        return [outcomes[i] for i in range(len(jobs))]

    def _attempt(
        self, conversations: list[Conversation], sampling: Sampling | None
    ) -> list[GuardOutput | GuardEngineError]:
        try:
            return list(self._batch(conversations, sampling))
        except GuardEngineError as exc:  # a prompt too long for the model: that one fails as such
            if len(conversations) == 1:
                return [exc]
        except Exception as exc:  # whatever torch or transformers raise becomes the engine's error
            if len(conversations) == 1:
                return [GuardEngineError(f"guard model failed: {type(exc).__name__}: {exc}")]
        return [self._attempt([conversation], sampling)[0] for conversation in conversations]

    def _batch(self, conversations: list[Conversation], sampling: Sampling | None) -> list[GuardOutput]:
        import torch

        rows = [self._encode(messages) for messages, _ in conversations]
        room = max(len(tokens) for tokens in self.verdicts) if sampling is None else sampling.max_tokens
        for row in rows:
            if self.context is not None and len(row) + room > self.context:
                raise GuardContextExceeded(f"{len(row)} prompt tokens and the answer do not fit in {self.context}")
        salts = [salt for _, salt in conversations]
        outputs: dict[int, GuardOutput] = {}
        with torch.inference_mode():
            for group in self._plan(rows, salts, sampling):
                chosen = [rows[index] for index in group.rows]
                done = self._score(chosen, group) if sampling is None else self._generate(chosen, group, sampling)
                outputs.update(zip(group.rows, done, strict=True))
        return [outputs[index] for index in range(len(rows))]

    def _encode(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if not isinstance(text, str):
            raise TypeError(f"the chat template rendered {type(text).__name__}, not text")
        if self.mode == "score":
            text += self.prefix
        return list(self.tokenizer.encode(text, add_special_tokens=False))  # the template places BOS itself

    def _plan(self, rows: list[list[int]], salts: list[str], sampling: Sampling | None) -> list[_Group]:
        """Split rows into forward passes: those sharing a stored prefix run together on its cache.

        Padding between a shared prefix and the rest of a row is masked, but a sliding-window layer counts the
        padded slots as part of its window. Rows of different lengths therefore share a pass only while the
        longest of them (and what is generated after it) fits in the window; otherwise score mode runs them
        one by one on the prefix (batching does not pay there), and generate mode batches them without it.
        """
        shared: dict[tuple[str, Tokens], _Group] = {}
        plain = _Group([])
        for index, (row, salt) in enumerate(zip(rows, salts, strict=True)):
            found = self._reusable(row, salt)
            if found is None:
                plain.rows.append(index)
            else:  # rows share a pass on a prefix only within one tenant: the cache is that tenant's
                shared.setdefault((salt, found[0]), _Group([], *found)).rows.append(index)
        extra = max(len(tokens) for tokens in self.verdicts) - 1 if sampling is None else sampling.max_tokens
        groups = []
        for group in shared.values():
            lengths = {len(rows[index]) for index in group.rows}
            if self.window is None or len(lengths) == 1 or max(lengths) + extra <= self.window:
                groups.append(group)
            elif sampling is None:
                first = group.rows[0]
                groups.extend(
                    _Group([index], group.prefix, group.cache, group.computed if index == first else 0)
                    for index in group.rows
                )
            else:
                plain.rows.extend(group.rows)
        return [plain, *groups] if plain.rows else groups

    def _reusable(self, row: list[int], salt: str) -> tuple[Tokens, Any, int] | None:
        """The stored prefix of `salt` that `row` starts with, its cache, and how many of its tokens were computed
        now: a prefix the store proposes is computed on the longest stored one it extends (only the new tokens;
        a stream's consecutive windows extend one another), else from its first token."""
        if self.prefixes is None:
            return None
        found = self.prefixes.find(row, salt)
        new = self.prefixes.propose(row, have=len(found[0]) if found else 0, salt=salt)
        if new is None:
            return None if found is None else (*found, 0)
        import torch

        start = len(found[0]) if found is not None else 0
        options: dict[str, Any] = {}
        if found is not None:  # the model appends to the cache it is given: the stored one stays as it was
            options[self.cache_name] = copy.deepcopy(found[1])
            options["attention_mask"] = torch.ones((1, len(new)), dtype=torch.long, device=self.device)
        out = self.model(
            input_ids=torch.tensor([new[start:]], device=self.device),
            position_ids=torch.arange(start, len(new), device=self.device)[None],
            use_cache=True,
            logits_to_keep=1,
            **options,
        )
        self.prefixes.put(new, out[self.cache_name], salt=salt)
        return new, out[self.cache_name], len(new) - start

    def _inputs(self, rows: list[list[int]], group: _Group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """Token ids after the prefix (left-padded), the attention mask over all tokens, positions, the cache."""
        import torch

        start = len(group.prefix)
        ids, mask = _left_pad([row[start:] for row in rows], self.pad_id, self.device)
        cache = None
        if group.cache is not None:
            mask = torch.cat([mask.new_ones(len(rows), start), mask], dim=1)
            cache = copy.deepcopy(group.cache)  # the model appends to the cache it is given
            cache.batch_repeat_interleave(len(rows))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids, mask, positions, cache

    def _score(self, rows: list[list[int]], group: _Group) -> list[GuardOutput]:
        # Every verdict's full continuation log-probability is compared, so a tokenizer that splits "unsafe"
        # (say "uns"+"afe") is scored exactly rather than by a first token shared with other words. Gemma's
        # tokenizer has one token each for "safe" and "unsafe" (after "{"), so one forward pass suffices;
        # longer continuations run on a copy of the prompt's KV cache, a few tokens each.
        import torch

        ids, mask, positions, cache = self._inputs(rows, group)
        if self.head is not None:
            scores = self.head.score(self.head.features(self._hidden(ids, mask, positions, cache)))
            return self._scored(rows, group, scores)
        extend = any(len(tokens) > 1 for tokens in self.verdicts)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions[:, -ids.shape[1] :],
            use_cache=extend or cache is not None,
            logits_to_keep=1,
            **({self.cache_name: cache} if cache is not None else {}),
        )
        first = out.logits[:, -1].float().log_softmax(-1)
        totals = []
        for tokens in self.verdicts:
            total = first[:, tokens[0]]
            if len(tokens) > 1:
                count = len(tokens) - 1
                step = self.model(
                    input_ids=torch.tensor([tokens[:-1]], device=ids.device).expand(len(ids), count),
                    attention_mask=torch.cat([mask, mask.new_ones(len(ids), count)], dim=1),
                    position_ids=positions[:, -1:] + 1 + torch.arange(count, device=ids.device),
                    use_cache=True,
                    **{self.cache_name: copy.deepcopy(out[self.cache_name])},
                )
                follow = step.logits.float().log_softmax(-1)[:, torch.arange(count), torch.tensor(tokens[1:])]
                total = total + follow.sum(-1)
            totals.append(total)
        scores = torch.sigmoid(totals[1] - totals[0]).tolist()  # P(unsafe) / (P(safe) + P(unsafe))
        return self._scored(rows, group, scores)

    @staticmethod
    def _scored(rows: list[list[int]], group: _Group, scores: list[float]) -> list[GuardOutput]:
        return [
            GuardOutput("", prompt_tokens=len(row), unsafe_probability=p, cached_tokens=group.cached(position))
            for position, (p, row) in enumerate(zip(scores, rows, strict=True))
        ]

    def _hidden(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> Any:
        """Every layer's hidden states of the new positions (the last one is the verdict position)."""
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions[:, -ids.shape[1] :],
            use_cache=cache is not None,
            logits_to_keep=1,
            output_hidden_states=True,
            **({self.cache_name: cache} if cache is not None else {}),
        )
        return out.hidden_states

    def features(self, jobs: list[Job], layers: tuple[int, ...]) -> list[list[float]]:
        """The hidden states of `layers` at each job's verdict position, side by side (what a verdict head
        reads; training computes them with the engine's own batching and prefix reuse)."""
        import torch

        rows = [self._encode(messages) for messages, _, _ in jobs]
        found: dict[int, list[float]] = {}
        with torch.inference_mode():
            for group in self._plan(rows, [salt for _, _, salt in jobs], None):
                hidden = self._hidden(*self._inputs([rows[index] for index in group.rows], group))
                stacked = torch.cat([hidden[layer][:, -1].float() for layer in layers], dim=-1)
                found.update(zip(group.rows, stacked.tolist(), strict=True))
        return [found[index] for index in range(len(rows))]

    def _generate(self, rows: list[list[int]], group: _Group, sampling: Sampling) -> list[GuardOutput]:
        options: dict[str, Any] = {"do_sample": sampling.temperature > 0}
        if sampling.temperature > 0:  # top_k=0 turns off transformers' default top-k of 50, as in vLLM
            options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        from transformers import GenerationMixin

        if not isinstance(self.model, GenerationMixin):
            raise TypeError(f"{type(self.model).__name__} cannot generate text")
        import torch

        ids, mask, _, cache = self._inputs(rows, group)
        if cache is not None:  # generate takes every token and reads only those the cache does not hold
            options[self.cache_name] = cache
            head = torch.tensor([group.prefix], dtype=ids.dtype, device=ids.device).expand(len(rows), -1)
            ids = torch.cat([head, ids], dim=1)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=sampling.max_tokens,
            repetition_penalty=sampling.repetition_penalty,
            eos_token_id=self.stops,
            pad_token_id=self.pad_id,
            **options,
        )
        results = []
        for position, (row, new) in enumerate(zip(rows, out[:, ids.shape[1] :].tolist(), strict=True)):
            end = next((i + 1 for i, token in enumerate(new) if token in self.stops), None)
            tokens = new if end is None else new[:end]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            text = text if isinstance(text, str) else "".join(text)
            results.append(
                GuardOutput(text, len(tokens), len(row), truncated=end is None, cached_tokens=group.cached(position))
            )
        return results


def _continuation(tokenizer: PreTrainedTokenizerBase, prefix: str, word: str) -> list[int]:
    head = tokenizer.encode(prefix, add_special_tokens=False)
    full = tokenizer.encode(prefix + word, add_special_tokens=False)
    if full[: len(head)] != head or len(full) == len(head):
        raise GuardEngineError(f"the tokenizer merges the end of score_prefix {prefix!r} into {word!r}")
    return list(full[len(head) :])


def _left_pad(rows: list[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[index, width - len(row) :] = 1
    return ids.to(device), mask.to(device)
