"""The OpenAI-compatible upstream: one pooled client (rsafe_proxy.http_client), its failures mapped once."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Mapping

from yarl import URL

from rsafe_proxy.errors import UpstreamTimeout, UpstreamUnavailable
from rsafe_proxy.http_client import (
    Answer,
    AnswerTooLarge,
    HttpClient,
    RequestFailed,
    RequestTimedOut,
    os_cause,
    tls_context,
)

# Headers that describe one hop, or that the proxy sets itself.
_NOT_FORWARDED = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "accept-encoding",
        # the proxy sends the body at once: an upstream that never answers "100 Continue" must not stall the call
        "expect",
        "authorization",
        "cookie",
        # headers some servers and frameworks route by instead of the request line: the upstream must route
        # by the path the proxy matched, never by one the client names
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-url",
        "x-original-uri",
        "x-rewrite-url",
        "x-forwarded-prefix",
        "x-forwarded-path",
        "x-envoy-original-path",
    }
)
# Upstream response headers the client never gets: those of one hop (RFC 9110 §7.6.1), those the proxy's own
# server sets (a second `date`/`server` would make two), the body's framing (the proxy may change the body), and
# those that name the upstream's servers or its origin: where it runs (`server`, `x-powered-by`, `via`), where
# else to reach it (`alt-svc`, which a client would apply to the proxy's origin) and its cookies (`cookie` is
# never forwarded, so they serve nobody and would be set on the proxy's origin, shared by its clients).
_NOT_RETURNED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-encoding",
        "date",
        "server",
        "x-powered-by",
        "via",
        "alt-svc",
        "set-cookie",
    }
)


# What HTTP allows as a header's name and value (RFC 9110 §5.1, §5.5; obs-text included, as uvicorn sends it).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


def forward_headers(headers: Mapping[str, str], authorization: str | None) -> dict[str, str]:
    """Client headers fit to send upstream, with the upstream's credentials. Hop-by-hop headers go, those the
    Connection header names included (RFC 9110 §7.6.1)."""
    dropped = _NOT_FORWARDED | _hop_names(headers)
    out = {name: value for name, value in headers.items() if name.lower() not in dropped}
    out["accept-encoding"] = "identity"  # the proxy must read what it screens
    if authorization:
        out["authorization"] = authorization
    return out


def _hop_names(headers: Mapping[str, str]) -> set[str]:
    """The headers a Connection header names (every one of them, where it is sent more than once)."""
    named = (value for name, value in headers.items() if name.lower() == "connection")
    return {name.strip().lower() for value in named for name in value.split(",")}


def returned_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Upstream response headers fit to pass back to the client: never one named like the proxy's own
    (`x-rsafe-*`), which an upstream could send to forge a verdict where the proxy sets none, nor one of those
    above or that its Connection header names. A header sent more than once comes back once, its values joined
    by commas. The upstream's `x-request-id` is returned (the OpenAI SDK reports it as the request id); where it
    sends none, the client's own comes back (telemetry.http)."""
    hop = _hop_names(headers)
    out: dict[str, str] = {}
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in _NOT_RETURNED or lowered in hop or lowered.startswith("x-rsafe-"):
            continue
        if not (_TOKEN.fullmatch(name) and _FIELD_VALUE.fullmatch(value)):
            continue  # not a header the proxy's server may send (a control character, say): dropped, not a crash
        out[lowered] = f"{out[lowered]}, {value}" if lowered in out else value
    return out


def host_of(url: str) -> str:
    """host:port of `url`: enough to name the server, never a path, query or credentials."""
    try:
        parsed = URL(url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:
        return "(an invalid address)"
    return f"{parsed.host}:{port}"


# An answer larger than this is read no further: a hostile or broken upstream must not fill the proxy's memory.
MAX_ANSWER_BYTES = 64 * 1024 * 1024


class Upstream:
    """Sends requests to the upstream LLM; the caller owns the answer and must close it."""

    def __init__(self, client: HttpClient, base_url: str) -> None:
        self.client = client
        self.base_url = base_url.rstrip("/")

    async def open(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        content: bytes | None = None,
        base_url: str | None = None,
        query: str = "",
    ) -> Answer:
        """Send the request and return the answer with its body unread (`chunks` or `read` it)."""
        url = f"{(base_url or self.base_url).rstrip('/')}/{path.lstrip('/')}"
        if query:
            url = f"{url}?{query}"
        try:
            return await self.client.open(method, url, headers, content)
        except RequestTimedOut as error:
            setting = "upstream.connect_timeout_s" if error.connecting else "upstream.timeout_s"
            raise UpstreamTimeout(
                f"The upstream model at {host_of(url)} did not answer in time: {error.cause} ({setting})."
            ) from None
        except RequestFailed as error:
            raise UpstreamUnavailable(
                f"The upstream model at {host_of(url)} could not be reached: {error.cause}."
            ) from None

    async def probe(self, timeout_s: float) -> str | None:
        """Open one connection to the upstream (DNS, TCP and, for https, the TLS handshake) and close it; None
        when that works, else why not. No request is sent: the check costs the upstream nothing and shows in
        no request log. For the start-up check and /readyz (a proxy in HTTPS_PROXY is not consulted)."""
        url = URL(self.base_url)
        secure = url.scheme == "https"
        port = url.port or (443 if secure else 80)
        context = tls_context() if secure else None
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(url.host, port, ssl=context, server_hostname=url.host if secure else None),
                timeout_s,
            )
        except TimeoutError:
            return f"{host_of(self.base_url)}: no connection within {timeout_s:g} s (upstream.connect_timeout_s)"
        except OSError as error:
            return f"{host_of(self.base_url)}: {os_cause(error)}"
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return None

    @staticmethod
    async def read(response: Answer, max_bytes: int = MAX_ANSWER_BYTES) -> bytes:
        """The whole body, mapping a broken transfer, or one over `max_bytes`, to UpstreamUnavailable."""
        try:
            return await response.read(max_bytes)
        except AnswerTooLarge:
            raise UpstreamUnavailable(f"The upstream model sent an answer over {max_bytes} bytes.") from None
        except RequestTimedOut:
            raise UpstreamTimeout("The upstream model stopped sending its answer in time.") from None
        except RequestFailed as error:
            raise UpstreamUnavailable(f"The upstream answer broke off: {error.cause}.") from None
        finally:
            await response.aclose()

    @staticmethod
    async def chunks(response: Answer) -> AsyncIterator[bytes]:
        """The body as it arrives, mapping a broken or stalled transfer to UpstreamUnavailable or UpstreamTimeout
        (the caller closes the response)."""
        try:
            async for chunk in response.chunks():
                yield chunk
        except RequestTimedOut:
            raise UpstreamTimeout("The upstream model stopped sending its answer in time.") from None
        except RequestFailed as error:
            raise UpstreamUnavailable(f"The upstream answer broke off: {error.cause}.") from None
