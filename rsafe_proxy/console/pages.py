"""The console's HTML: Jinja templates shipped in the package, autoescaped (every value is text, whatever it
holds), and its one stylesheet."""

from __future__ import annotations

from importlib import resources
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

from rsafe_proxy.console.filters import show_time


class Pages:
    """Renders the console's templates."""

    def __init__(self) -> None:
        self._templates = Environment(
            loader=PackageLoader("rsafe_proxy.console", "templates"),
            autoescape=True,  # every template, whatever its name: a prompt holding <script> renders as text
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._templates.filters["when"] = show_time
        self.stylesheet = resources.files("rsafe_proxy.console").joinpath("static", "console.css").read_bytes()

    def render(self, template: str, **context: Any) -> str:
        """The page `template` renders with `context`."""
        return self._templates.get_template(template).render(**context)
