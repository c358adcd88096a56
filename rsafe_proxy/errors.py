"""One exception tree for everything the proxy answers with an error; each class knows its status and code."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar


class ProxyError(Exception):
    """An error the client receives as an OpenAI-style body: {"error": {message, type, param, code}}."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, extra: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        """The JSON body sent to the client."""
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": {**error, **self.extra}}

    def headers(self) -> dict[str, str]:
        """Extra response headers."""
        return {}


class InvalidRequest(ProxyError):
    """The request is malformed: bad JSON, wrong types, a field the proxy cannot screen."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class PayloadTooLarge(ProxyError):
    """The body is larger than server.max_body_bytes."""

    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"

    def headers(self) -> dict[str, str]:
        # the proxy may have stopped reading the body before its end: the connection cannot be reused
        return {"connection": "close"}


class HeadTooLarge(ProxyError):
    """The request line and headers are larger than the server reads (the connection is closed)."""

    status = 431
    type = "invalid_request_error"
    code = "request_header_fields_too_large"


class ContentTooLong(ProxyError):
    """The content needs more guard calls than one request may use (guard.max_segments): refused, because
    content the guard has not judged is never passed on."""

    status = 413
    type = "invalid_request_error"
    code = "content_too_long"


class Unauthorized(ProxyError):
    """No key, or a key that belongs to no tenant."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(ProxyError):
    """A path the proxy does not serve."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(ProxyError):
    """A method no route of the path serves (`allow`: those that do)."""

    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, message: str, allow: str) -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"allow": self.allow}


class ContentBlocked(ProxyError):
    """The prompt violates the tenant's policy. A 400 that clients must not retry (never a 5xx)."""

    status = 400
    type = "invalid_request_error"
    code = "content_filter"

    def __init__(self, message: str, categories: Sequence[str], extra: Mapping[str, Any] | None = None) -> None:
        super().__init__(message, extra={"categories": list(categories), **(extra or {})})
        self.categories = tuple(categories)

    def headers(self) -> dict[str, str]:
        return {"x-should-retry": "false", "x-rsafe-categories": ",".join(self.categories)}


class GuardUnavailable(ProxyError):
    """The guard failed, timed out or gave no readable verdict, and the policy fails closed."""

    status = 503
    type = "server_error"
    code = "guard_unavailable"


class UpstreamUnavailable(ProxyError):
    """The upstream LLM could not be reached."""

    status = 502
    type = "server_error"
    code = "upstream_unavailable"


class UpstreamTimeout(ProxyError):
    """The upstream LLM did not answer in time."""

    status = 504
    type = "server_error"
    code = "upstream_timeout"


class RequestTimeout(ProxyError):
    """The client sent its request body too slowly (server.body_idle_timeout_s, server.body_timeout_s)."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"

    def headers(self) -> dict[str, str]:
        # the rest of the body may still be on its way: the connection cannot carry another request
        return {"connection": "close"}


class ServerBusy(ProxyError):
    """More client connections are open than server.max_connections allows."""

    status = 503
    type = "server_error"
    code = "server_overloaded"

    def headers(self) -> dict[str, str]:
        return {"connection": "close"}  # the connection is the resource that ran out


class ServerShuttingDown(ProxyError):
    """The proxy is stopping and the request did not finish within server.shutdown_grace_s."""

    status = 503
    type = "server_error"
    code = "server_shutting_down"

    def headers(self) -> dict[str, str]:
        return {"connection": "close"}


class InternalError(ProxyError):
    """A fault in the proxy itself. The body says nothing of it; the log has the trace."""

    status = 500
    type = "server_error"
    code = "internal_error"
