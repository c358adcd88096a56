"""The view of a text the guard judges: what a model reads, not the bytes a literal guard would match.

A model reads through zero-width characters inside a word, fullwidth and other compatibility forms, soft
hyphens and bidi controls; it can also read text hidden in Unicode tag characters ("ASCII smuggling") and in
runs of variation selectors ("emoji smuggling"). The guard therefore judges the NFKC form with every format
character (category Cf) removed, and with smuggled text made visible rather than dropped: removing it would
hide from the guard exactly what the upstream model still reads. Every line break a model may read as one
(CR, vertical tab, form feed, NEL, U+2028/9) becomes "\n", so that no neutraliser that works line by line is
passed by a forged line after an exotic break. The upstream always gets the original.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

# Tag characters U+E0020..U+E007E mirror printable ASCII; a model that was shown them decodes them.
_TAG_BASE = 0xE0000
_TAGS = re.compile("[\U000e0020-\U000e007e]+")
# Variation selectors carry one byte each (VS1-16 -> 0-15, VS17-256 -> 16-255); one after an emoji is
# ordinary presentation, a run of them is data.
_SELECTORS = re.compile("[\ufe00-\ufe0f\U000e0100-\U000e01ef]{2,}")
_TAGS_ONE = re.compile("[\U000e0020-\U000e007e]")
_SELECTOR = re.compile("[\ufe00-\ufe0f\U000e0100-\U000e01ef]")
_BREAKS = str.maketrans({"\r": "\n", "\x0b": "\n", "\x0c": "\n", "\x85": "\n", "\u2028": "\n", "\u2029": "\n"})


def _tags(match: re.Match[str]) -> str:
    return " " + "".join(chr(ord(char) - _TAG_BASE) for char in match.group()) + " "


def _selector_byte(char: str) -> int:
    point = ord(char)
    return point - 0xFE00 if point <= 0xFE0F else point - 0xE0100 + 16


def _selectors(match: re.Match[str]) -> str:
    data = bytes(_selector_byte(char) for char in match.group())
    return " " + data.decode("utf-8", errors="replace") + " "


def _without_format(text: str) -> str:
    return "".join(char for char in text if unicodedata.category(char) != "Cf")


def normalise(text: str) -> str:
    """`text` as the guard judges it: smuggled text revealed, format characters removed, NFKC, line breaks "\n"."""
    text = text.replace("\r\n", "\n").translate(_BREAKS)
    if text.isascii():  # nothing to fold: the common case costs two scans
        return text
    revealed = _SELECTORS.sub(_selectors, _TAGS.sub(_tags, text))
    # format characters go before NFKC (so that what they kept apart composes) and after (NFKC can make some)
    return _without_format(unicodedata.normalize("NFKC", _without_format(revealed)))


def normalised_bound(text: str) -> int:
    """An upper bound of `len(normalise(text))`, computed without normalising: NFKC never makes a text longer
    than its characters' compatibility decompositions (up to 18 characters for one); a revealed tag character
    is one character and two spaces, a variation selector at most one character (of up to 18) and two spaces.
    Lets a caller refuse a text before NFKC blows it up."""
    if text.isascii():
        return len(text)
    expanded = sum(count * len(unicodedata.normalize("NFKD", char)) for char, count in Counter(text).items())
    return expanded + 2 * len(_TAGS_ONE.findall(text)) + 20 * len(_SELECTOR.findall(text))
