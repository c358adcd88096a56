"""The guard model's hidden states at the verdict position of labelled rows: what a verdict head is trained on.

Each row is rendered exactly as the screener renders it for the engine (the same template, policy,
normalisation and output-side context), then run through the transformers engine's own runner (its batching
and prefix reuse), so the features are those the engine computes when it serves. They are computed once:
stored in shards under a cache folder, keyed by a hash of the rendered prompt and of what produced them
(the model's and the adapter's files, read, not named by their folders; the layers), so a changed row, or a
model retrained in place, is computed afresh and an unchanged one never again.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rsafe_proxy.datasets import Row
from rsafe_proxy.guard.engine import Sampling, chat_messages
from rsafe_proxy.guard.normalise import normalise
from rsafe_proxy.guard.protocol import Side
from rsafe_proxy.guard.screen import Screener
from rsafe_proxy.policy.schema import Policy

if TYPE_CHECKING:
    import numpy as np

# The end of the prompt an answer is judged after: what the screener reads with the embedded engine's segments
# (a quarter of 4000 characters). Long content itself is clipped (`clipped`) to keep a row's cost bounded.
CONTEXT_CHARS = 1000


@dataclass(frozen=True)
class Rendered:
    """A row's guard prompt and the key its features are stored under."""

    row: Row
    prompt: str

    @property
    def key(self) -> str:
        """A hash of the rendered prompt: the same text always has the same features."""
        return hashlib.sha256(self.prompt.encode()).hexdigest()[:32]


def clipped(text: str, max_chars: int) -> str:
    """`text` when it is at most `max_chars` long; else its start and its end (a jailbreak's question often comes
    last), about five eighths and three eighths of `max_chars`, joined by an ellipsis."""
    if len(text) <= max_chars:
        return text
    head = max_chars * 5 // 8
    return f"{text[:head]} … {text[len(text) - (max_chars - head) :]}"


def render_rows(screener: Screener, policy: Policy, rows: Sequence[Row], max_chars: int) -> list[Rendered]:
    """Each row's guard prompt as the screener sends it: normalised, its content clipped to `max_chars`, and on
    the output side after the end of the prompt it answers."""
    rendered = []
    for row in rows:
        if row.side is Side.INPUT:
            text = screener.render(policy, row.side, normalise(clipped(row.prompt, max_chars)))
        else:
            context = normalise(row.prompt[-CONTEXT_CHARS:])
            text = screener.render(policy, row.side, context, normalise(clipped(row.response or "", max_chars)))
        rendered.append(Rendered(row, text))
    return rendered


class FeatureCache:
    """Features stored in numbered shards (`.npz`: keys and a float16 matrix) in one folder per producer."""

    def __init__(self, folder: Path, producer: dict[str, Any]) -> None:
        tag = hashlib.sha256(json.dumps(producer, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = folder / f"features-{tag}"
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "producer.json").write_text(json.dumps(producer, indent=2, sort_keys=True) + "\n")
        self._known: dict[str, np.ndarray] = {}
        import numpy as np

        for shard in sorted(self.folder.glob("shard-*.npz")):
            with np.load(shard) as data:
                self._known.update(zip(data["keys"].tolist(), data["features"], strict=True))

    def __contains__(self, key: str) -> bool:
        return key in self._known

    def get(self, key: str) -> np.ndarray:
        """The stored features of `key` (KeyError when not computed)."""
        return self._known[key]

    def add(self, keys: Sequence[str], features: Sequence[Sequence[float]]) -> None:
        """Store one shard."""
        import numpy as np

        matrix = np.asarray(features, dtype=np.float16)
        number = len(list(self.folder.glob("shard-*.npz")))
        np.savez(self.folder / f"shard-{number:05d}.npz", keys=np.asarray(list(keys)), features=matrix)
        self._known.update(zip(keys, matrix, strict=True))


# the engine runner's `features`: (messages, sampling, cache salt) jobs and layers -> one feature row per job
Features = Callable[[list[tuple[list[dict[str, str]], Sampling, str]], tuple[int, ...]], list[list[float]]]


def compute(
    features: Features,
    rendered: Sequence[Rendered],
    cache: FeatureCache,
    layers: tuple[int, ...],
    *,
    batch: int = 8,
    shard: int = 256,
    progress: bool = True,
) -> None:
    """Compute the features of every rendered row not yet in `cache`, shortest first (less padding)."""
    todo: dict[str, Rendered] = {}
    for item in rendered:
        if item.key not in cache:
            todo.setdefault(item.key, item)
    pending = sorted(todo.values(), key=lambda item: len(item.prompt))
    started, done = time.monotonic(), 0
    for begin in range(0, len(pending), shard):
        chunk = pending[begin : begin + shard]
        computed: list[list[float]] = []
        for first in range(0, len(chunk), batch):
            jobs = [(chat_messages(item.prompt), Sampling(), "train") for item in chunk[first : first + batch]]
            computed.extend(features(jobs, layers))
        cache.add([item.key for item in chunk], computed)
        done += len(chunk)
        if progress:
            rate = done / max(time.monotonic() - started, 1e-9)
            left = (len(pending) - done) / rate
            print(
                f"features: {done}/{len(pending)} rows, {rate:.1f} rows/s, ~{left / 60:.0f} min left",
                file=sys.stderr,
                flush=True,
            )


def matrix(rendered: Sequence[Rendered], cache: FeatureCache) -> np.ndarray:
    """The features of `rendered`, one row each (float32)."""
    import numpy as np

    return np.stack([cache.get(item.key) for item in rendered]).astype(np.float32)
