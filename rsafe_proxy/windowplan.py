"""Where a streamed answer is cut into the windows the guard judges: about a sentence first, then larger.

The first window closes at the first sentence end once it holds `first_chars` characters, or at twice that in
any case, so that the first text reaches the client after about one sentence and one verdict. Each later
window aims at twice the one before, up to `max_chars` (where it closes at once). Every window is judged with
the whole answer so far, so where a window ends decides how soon its text is released and how often the guard
is asked, never how much of the answer the guard sees.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# A sentence ends at a full stop, question or exclamation mark or ellipsis before a space, a closing quote or
# bracket, or the end of the text; at an ideographic full stop, question or exclamation mark; or at a line break.
_SENTENCE_END = re.compile(r"[.!?\u2026](?=[\s\"'\u201d\u2019)\]]|$)|[\u3002\uff01\uff1f]|\n")


@dataclass(frozen=True)
class WindowPlan:
    """Window sizes in characters: window 0 aims at `first_chars`, each next one at twice the one before, none
    beyond `max_chars`."""

    first_chars: int
    max_chars: int

    def __post_init__(self) -> None:
        if not 1 <= self.first_chars <= self.max_chars:
            raise ValueError("first_chars must be at least 1 and at most max_chars")

    def target(self, number: int) -> int:
        """The size window `number` (0: the first) aims at."""
        return min(self.first_chars << min(number, 40), self.max_chars)  # 2**40 is beyond any window

    def closes(self, number: int, size: int, added: str) -> bool:
        """Whether window `number`, `size` characters long once `added` joined it, is complete: at a sentence end
        in `added` once it reaches its target, and at twice its target (at most `max_chars`) in any case."""
        target = self.target(number)
        if size >= min(2 * target, self.max_chars):
            return True
        return size >= target and _SENTENCE_END.search(added) is not None


@dataclass
class ChoiceText:
    """One choice's streamed answer as windows: the text of the windows closed so far, and the open one's."""

    closed: str = ""
    pending: list[str] = field(default_factory=list)
    size: int = 0  # characters pending

    def add(self, text: str) -> None:
        """Add `text` to the open window."""
        self.pending.append(text)
        self.size += len(text)

    def close(self) -> str | None:
        """Close the open window: the whole answer so far (what the guard judges), or None when the window added
        no text to this choice."""
        new = "".join(self.pending)
        self.pending.clear()
        self.size = 0
        self.closed += new
        return self.closed if new.strip() else None
