"""The OpenAI-compatible upstream: one pooled httpx client, transport errors mapped once."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Mapping

import certifi
import httpx

from rsafe_proxy.errors import UpstreamTimeout, UpstreamUnavailable

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


def forward_headers(headers: Mapping[str, str], authorization: str | None) -> dict[str, str]:
    """Client headers fit to send upstream, with the upstream's credentials. Hop-by-hop headers go, those the
    Connection header names included (RFC 9110 §7.6.1)."""
    hop = {name.strip().lower() for value in _values(headers, "connection") for name in value.split(",")}
    out = {name: value for name, value in headers.items() if name.lower() not in _NOT_FORWARDED | hop}
    out["accept-encoding"] = "identity"  # the proxy must read what it screens
    if authorization:
        out["authorization"] = authorization
    return out


def _values(headers: Mapping[str, str], wanted: str) -> list[str]:
    return [value for name, value in headers.items() if name.lower() == wanted]


def returned_headers(headers: httpx.Headers) -> dict[str, str]:
    """Upstream response headers fit to pass back to the client: never one named like the proxy's own
    (`x-rsafe-*`), which an upstream could send to forge a verdict where the proxy sets none, nor one of those
    above or that its Connection header names. The upstream's `x-request-id` is returned (the OpenAI SDK reports
    it as the request id); where it sends none, the client's own comes back (telemetry.http)."""
    hop = {name.strip().lower() for value in headers.get_list("connection") for name in value.split(",")}
    return {
        name: value
        for name, value in headers.items()
        if name.lower() not in _NOT_RETURNED | hop and not name.lower().startswith("x-rsafe-")
    }


def host_of(url: str) -> str:
    """host:port of `url`: enough to name the server, never a path, query or credentials."""
    parsed = httpx.URL(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return f"{parsed.host}:{port}"


def cause(error: httpx.HTTPError) -> str:
    """Why a request failed, in words a user can act on: DNS, refused, TLS, timeout, a broken connection."""
    if isinstance(error, httpx.ConnectTimeout):
        return "no connection within the connect timeout (upstream.connect_timeout_s)"
    if isinstance(error, httpx.TimeoutException):
        return "no answer within the timeout (upstream.timeout_s)"
    seen: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and link not in seen:  # httpx wraps httpcore's error, which wraps the OS error
        seen.append(link)
        link = link.__cause__ or link.__context__
    for reason in seen:
        if isinstance(reason, OSError) and (words := _os_cause(reason, plain=False)):
            return words
    text = str(error) or type(error).__name__
    if "ssl" in text.lower() or "certificate" in text.lower():
        return f"the TLS handshake failed ({text})"
    if isinstance(error, httpx.ConnectError):
        return f"the connection failed ({text})"
    return f"the connection broke ({type(error).__name__}: {text})"


def _os_cause(error: OSError, plain: bool = True) -> str:
    """An OS-level connection error in words: DNS, refused, TLS; with `plain`, anything else as the OS says it
    (else the empty string, so that the caller can look further)."""
    if isinstance(error, socket.gaierror):
        return f"the host name could not be resolved (DNS: {error.strerror or error})"
    if isinstance(error, ConnectionRefusedError):
        return "the connection was refused (nothing listens on that port)"
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"the TLS certificate was not accepted ({error.verify_message or error.reason})"
    if isinstance(error, ssl.SSLError):
        return f"the TLS handshake failed ({error.reason or error})"
    return f"the connection failed ({error.strerror or error})" if plain else ""


# An answer larger than this is read no further: a hostile or broken upstream must not fill the proxy's memory.
MAX_ANSWER_BYTES = 64 * 1024 * 1024


class Upstream:
    """Sends requests to the upstream LLM; the caller owns the response and must close it."""

    def __init__(self, client: httpx.AsyncClient, base_url: str) -> None:
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
    ) -> httpx.Response:
        """Send the request and return the response with its body unread (stream it or `aread` it)."""
        url = f"{(base_url or self.base_url).rstrip('/')}/{path.lstrip('/')}"
        if query:
            url = f"{url}?{query}"
        request = self.client.build_request(method, url, headers=headers, content=content)
        try:
            return await self.client.send(request, stream=True)
        except httpx.TimeoutException as error:
            raise UpstreamTimeout(
                f"The upstream model at {host_of(url)} did not answer in time: {cause(error)}."
            ) from None
        except httpx.HTTPError as error:
            raise UpstreamUnavailable(
                f"The upstream model at {host_of(url)} could not be reached: {cause(error)}."
            ) from None

    async def probe(self, timeout_s: float) -> str | None:
        """Open one connection to the upstream (DNS, TCP and, for https, the TLS handshake) and close it; None
        when that works, else why not. No request is sent: the check costs the upstream nothing and shows in
        no request log. For the start-up check and /readyz (a proxy in HTTPS_PROXY is not consulted)."""
        url = httpx.URL(self.base_url)
        secure = url.scheme == "https"
        port = url.port or (443 if secure else 80)
        context = ssl.create_default_context(cafile=certifi.where()) if secure else None
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(url.host, port, ssl=context, server_hostname=url.host if secure else None),
                timeout_s,
            )
        except TimeoutError:
            return f"{host_of(self.base_url)}: no connection within {timeout_s:g} s (upstream.connect_timeout_s)"
        except OSError as error:
            return f"{host_of(self.base_url)}: {_os_cause(error)}"
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return None

    @staticmethod
    async def read(response: httpx.Response, max_bytes: int = MAX_ANSWER_BYTES) -> bytes:
        """The whole body, mapping a broken transfer, or one over `max_bytes`, to UpstreamUnavailable."""
        try:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise UpstreamUnavailable(f"The upstream model sent an answer over {max_bytes} bytes.")
            return bytes(body)
        except httpx.TimeoutException:
            raise UpstreamTimeout("The upstream model stopped sending its answer in time.") from None
        except httpx.HTTPError as error:
            raise UpstreamUnavailable(f"The upstream answer broke off: {type(error).__name__}.") from None
        finally:
            await response.aclose()

    @staticmethod
    async def chunks(response: httpx.Response) -> AsyncIterator[bytes]:
        """The body as it arrives, mapping a broken or stalled transfer to UpstreamUnavailable or UpstreamTimeout
        (the caller closes the response)."""
        try:
            async for chunk in response.aiter_bytes():
                yield chunk
        except httpx.TimeoutException:
            raise UpstreamTimeout("The upstream model stopped sending its answer in time.") from None
        except httpx.HTTPError as error:
            raise UpstreamUnavailable(f"The upstream answer broke off: {type(error).__name__}.") from None
