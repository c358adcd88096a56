"""The request target made canonical before routing (pure ASGI middleware), and the route patterns matched on it.

Routing and the upstream URL see one spelling of each path: `/v1/x/../chat/completions`, `/v1//chat/completions/`
and `/v1/chat/%63ompletions` all become `/v1/chat/completions`. A target that has no single safe reading (an
encoded `/` or `\\`, an encoded dot segment, `..` above the root, `;` path parameters, control characters,
non-UTF-8, an absolute-form or `*` target) is refused with 400 before anything sees it, since a lenient
upstream could read it as a route the proxy screens. Credentials in the query string are removed in place, so
that neither the upstream nor uvicorn's access log (which prints the scope's query) ever sees them.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable
from urllib.parse import quote, unquote, unquote_plus

from starlette.types import ASGIApp, Receive, Scope, Send

from rsafe_proxy.errors import InvalidRequest
from rsafe_proxy.middleware import send_error

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# RFC 3986 pchar without ';' (path parameters, which some servers strip before routing) and '%' (a literal '%'
# would be decoded once more by an upstream that decodes twice)
_SEGMENT_ASCII = _UNRESERVED | frozenset(b"!$&'()*+,=:@")
_SAFE_IN_QUOTE = "/!$&'()*+,=:@"  # what `quote` keeps besides the unreserved characters
_HEX = frozenset(b"0123456789abcdefABCDEF")

# Query parameters that carry credentials in some API or other: never forwarded, never logged.
CREDENTIAL_PARAMETERS = frozenset(
    {"api_key", "api-key", "apikey", "key", "x-api-key", "access_token", "token", "auth", "authorization"}
)

_PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")


def _refused(why: str) -> InvalidRequest:
    return InvalidRequest(f"The request path cannot be served: {why}.")


def _decoded_segment(raw: bytes) -> str:
    """One path segment with its percent-escapes decoded, or InvalidRequest."""
    out = bytearray()
    position = 0
    while position < len(raw):
        byte = raw[position]
        if byte == 0x25:  # '%'
            escape = raw[position + 1 : position + 3]
            if len(escape) != 2 or not set(escape) <= _HEX:
                raise _refused("it holds a malformed percent-escape")
            byte = int(escape, 16)
            if byte in b"/\\":
                raise _refused("it holds an encoded '/' or '\\'")
            if byte < 0x80 and byte not in _SEGMENT_ASCII:
                raise _refused(f"it holds an encoded character (%{byte:02X}) that paths here never need")
            position += 3
        else:
            if byte == 0x5C:
                raise _refused("it holds a backslash")
            if byte == 0x3B:
                raise _refused("it holds ';' path parameters")
            if byte not in _SEGMENT_ASCII:
                raise _refused("it holds a character that must not appear in a path (control, space or delimiter)")
            position += 1
        out.append(byte)
    try:
        segment = out.decode("utf-8")
    except UnicodeDecodeError:
        raise _refused("it is not UTF-8") from None
    if not segment.isascii():
        if any(unicodedata.category(char)[0] in "CZ" for char in segment):
            raise _refused("it holds an invisible or control character")
        if unicodedata.normalize("NFKC", segment) != segment:
            # a fullwidth full stop or solidus (U+FF0E, U+FF0F) reads as '.' or '/' to a server that normalises
            raise _refused("it holds characters with a compatibility form")
    if segment in (".", "..") and b"%" in raw:
        raise _refused("it holds an encoded dot segment")
    return segment


def canonical_path(raw: bytes) -> tuple[str, bytes]:
    """The canonical (decoded path, raw path) for a raw request path: dot segments resolved, empty segments and
    the trailing slash removed, unreserved characters decoded; InvalidRequest when there is no safe reading."""
    if not raw.startswith(b"/"):
        raise _refused("it is not an absolute path (absolute-form and '*' request targets are not served)")
    segments: list[str] = []
    for raw_segment in raw[1:].split(b"/"):
        segment = _decoded_segment(raw_segment)
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                raise _refused("'..' climbs above the root")
            segments.pop()
            continue
        segments.append(segment)
    path = "/" + "/".join(segments)
    return path, quote(path, safe=_SAFE_IN_QUOTE).encode("ascii")


def _credential(part: bytes, is_secret: Callable[[str], bool]) -> bool:
    for pair in re.split(rb"[;&]", part):  # some servers split queries on ';' too
        name, _, value = pair.partition(b"=")
        if unquote_plus(name.decode("latin-1")).strip().lower() in CREDENTIAL_PARAMETERS:
            return True
        if value and is_secret(unquote_plus(value.decode("latin-1"))):
            return True
    return False


def without_credentials(query: bytes, is_secret: Callable[[str], bool]) -> bytes:
    """`query` without the parameters that carry credentials (by name, or a value `is_secret` knows)."""
    if not query:
        return query
    parts = query.split(b"&")
    kept = [part for part in parts if not _credential(part, is_secret)]
    return query if len(kept) == len(parts) else b"&".join(kept)


def _never_secret(scope: Scope, value: str) -> bool:
    return False


class CanonicalPath:
    """Rewrites scope['path'] and scope['raw_path'] to the canonical path (refusing what has none, with 400)
    and removes credentials from scope['query_string']. The scope is changed in place, on purpose: the server
    logs the request from this same dict."""

    def __init__(self, app: ASGIApp, is_secret: Callable[[Scope, str], bool] = _never_secret) -> None:
        self.app = app
        self.is_secret = is_secret

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        query = scope.get("query_string", b"")
        scope["query_string"] = without_credentials(query, lambda value: self.is_secret(scope, value))
        raw = scope.get("raw_path")
        if raw is None:  # a server that gives only the decoded path: its own spelling is all there is
            raw = quote(scope["path"], safe=_SAFE_IN_QUOTE).encode("ascii")
        try:
            path, canonical = canonical_path(raw)
            if unquote(raw.decode("ascii"), errors="strict") != scope["path"]:
                raise _refused("its decoded and raw forms disagree")
            if not scope["query_string"].isascii():
                raise InvalidRequest("The query string cannot be served: it holds bytes that are not ASCII.")
        except (InvalidRequest, UnicodeDecodeError) as error:
            refusal = error if isinstance(error, InvalidRequest) else _refused("it is not UTF-8")
            await send_error(send, refusal)
            return
        scope["path"], scope["raw_path"] = path, canonical
        await self.app(scope, receive, send)


# -- route patterns: `/v1/files/{file_id}`, one placeholder per segment ----------------------------------------


def pattern_problem(pattern: str) -> str | None:
    """Why `pattern` is not a route pattern the proxy can match, or None. A pattern is a canonical path under
    /v1/ whose segments are literals or whole-segment `{name}` placeholders; the segment after /v1 is literal."""
    if not pattern.startswith("/v1/"):
        return "must start with /v1/"
    segments = pattern.split("/")[2:]
    if not segments[0] or _PLACEHOLDER.fullmatch(segments[0]):
        return "the segment after /v1/ must be a literal name, like /v1/files"
    for segment in segments:
        if _PLACEHOLDER.fullmatch(segment):
            continue
        if "{" in segment or "}" in segment:
            return f"{segment!r}: a placeholder is a whole segment, like {{file_id}}"
        if not segment:
            return "no empty segments ('//') and no trailing '/'"
        if segment in (".", "..") or not set(segment.encode()) <= _SEGMENT_ASCII:
            return (
                f"{segment!r} is not a canonical path segment (letters, digits and -._~!$&'()*+,=:@; no dot segments)"
            )
    return None


def pattern_regex(patterns: Iterable[str]) -> re.Pattern[str]:
    """One regex that a canonical path fully matches exactly when `pattern_matches` holds for one of `patterns`
    (a placeholder segment: one or more characters other than `/`); none: a regex nothing matches."""
    alternatives = [
        "/".join("[^/]+" if _PLACEHOLDER.fullmatch(segment) else re.escape(segment) for segment in pattern.split("/"))
        for pattern in patterns
    ]
    return re.compile("|".join(f"(?:{alternative})" for alternative in alternatives) if alternatives else "(?!)")


def pattern_matches(pattern: str, path: str) -> bool:
    """True when canonical `path` matches `pattern` (a placeholder matches exactly one segment)."""
    wanted, given = pattern.split("/"), path.split("/")
    if len(wanted) != len(given):
        return False
    return all(
        (_PLACEHOLDER.fullmatch(want) is not None and bool(got)) or want == got
        for want, got in zip(wanted, given, strict=True)
    )
