"""The OpenAI-compatible upstream: one pooled httpx client, transport errors mapped once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

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
_NOT_RETURNED = frozenset({"content-length", "transfer-encoding", "connection", "content-encoding", "keep-alive"})


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
    """Upstream response headers fit to pass back to the client."""
    return {name: value for name, value in headers.items() if name.lower() not in _NOT_RETURNED}


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
            raise UpstreamTimeout(f"The upstream model did not answer in time ({type(error).__name__}).") from None
        except httpx.HTTPError as error:
            raise UpstreamUnavailable(f"The upstream model could not be reached: {type(error).__name__}.") from None

    @staticmethod
    async def read(response: httpx.Response) -> bytes:
        """The whole body, mapping a broken transfer to UpstreamUnavailable."""
        try:
            return await response.aread()
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
