"""What a request's payload slot carries (an image, audio, a file: `image_url`, `input_audio.data`,
`file_data`): the text the model would read in it, or nothing a guard can read.

A request is judged by where a string sits, not by how it looks: text in a text slot is judged whatever it looks
like (base64, a data: URL). Only a payload slot holds binary data, and even there a payload that is text (a file
that is base64 of UTF-8, a string that is no base64 at all) is read as that text, so no payload carries text past
the guard. What stays unread is binary: images, audio, files that are not text in UTF-8 (or in UTF-16 with a
byte-order mark), such as a PDF.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re

# The keys of a request that hold a payload: chat `image_url.url`, Responses `input_image.image_url`,
# `input_audio.data`, chat `file.file_data` and Responses `input_file.file_data`.
PAYLOAD_KEYS = frozenset({"url", "image_url", "data", "file_data"})
_DATA_URL = re.compile(r"data:[\w.+/-]*(;[\w.+=-]+)*;base64,", re.ASCII)
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]*={0,2}", re.ASCII)
_URLSAFE = str.maketrans("-_", "+/")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def payload_text(value: str) -> str | None:
    """The text a payload slot's string gives the model: the string itself when it is no base64 (a URL, plain
    text), the decoded text when it is base64 (or a base64 data: URL) of UTF-8 or BOM-marked UTF-16 text
    (without its control characters); None for binary data."""
    prefix = _DATA_URL.match(value)
    encoded = "".join((value[prefix.end() :] if prefix else value).split())  # line-wrapped base64 too
    if not encoded or not _BASE64.fullmatch(encoded):
        return value
    padded = encoded.translate(_URLSAFE) + "=" * (-len(encoded) % 4)
    try:
        raw = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        return value
    try:
        # UTF-16 only with its byte-order mark: without one, any even run of bytes would read as UTF-16
        decoded = raw.decode("utf-16" if raw[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else "utf-8")
    except UnicodeDecodeError:
        return None
    # control characters say nothing (UTF-16 text, read as UTF-8, is its letters between NULs): the guard reads
    # the letters, and a silent recording (all NULs) is no text to judge
    return _CONTROL.sub("", decoded)
