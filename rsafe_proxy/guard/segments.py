"""Content longer than the guard's budget, cut into overlapping segments that are all judged.

Segments start at fixed offsets from the beginning of the text, so a text that grows at its end (a
conversation, turn by turn) keeps the segments it had: their verdicts come from the cache. Each segment
overlaps the next by `overlap` characters, so a phrase cut at a boundary is whole in one of them.
"""

from __future__ import annotations


def segment_count(length: int, size: int, overlap: int) -> int:
    """How many segments a text of `length` characters is judged in."""
    if length <= size:
        return 1
    step = size - overlap
    return -(-(length - overlap) // step)  # ceiling: the last segment ends at the text's end


def segments(text: str, size: int, overlap: int) -> list[str]:
    """`text` in segments of at most `size` characters, each overlapping the next by `overlap`; none is
    dropped and every character is in at least one."""
    if size <= overlap or overlap < 0:
        raise ValueError("a segment must be longer than its overlap, and the overlap at least 0")
    if len(text) <= size:
        return [text]
    step = size - overlap
    return [text[start : start + size] for start in range(0, len(text) - overlap, step)]


def halves(text: str, overlap: int) -> list[str]:
    """`text` in two overlapping halves (for an engine that found a segment too long after all)."""
    middle = len(text) // 2
    reach = min(overlap // 2, middle // 2)
    return [text[: middle + reach], text[middle - reach :]]
