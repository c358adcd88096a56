"""One dialect per API the proxy screens: where its texts live in a request, an answer and a stream event, and
how to stop or rewrite them. The only place that knows an API's shapes; a route picks its dialect once."""

from rsafe_proxy.apis.chat import CHAT
from rsafe_proxy.apis.completions import COMPLETIONS
from rsafe_proxy.apis.dialect import Dialect
from rsafe_proxy.apis.responses import RESPONSES

__all__ = ["CHAT", "COMPLETIONS", "RESPONSES", "Dialect"]
