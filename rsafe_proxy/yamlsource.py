"""YAML files read with their line numbers, and validation errors told as `file:line: problem`.

Compliance teams edit policy files and operators edit proxy.yaml by hand; a mistake must point at its line
in plain words, never at a traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from rsafe_proxy.plainerrors import plain

Model = TypeVar("Model", bound=pydantic.BaseModel)


@dataclass(frozen=True)
class Problem:
    """One mistake in a file."""

    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.message}"


class FileInvalid(Exception):
    """A file that cannot be used, with every problem found in it."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


class InvalidPart(ValueError):
    """Raised by a validator about one part of the value it checks (the second of two equal ids, say):
    `location` is relative to the validated field, so the problem points at that part's line."""

    def __init__(self, location: Sequence[str | int], message: str) -> None:
        super().__init__(message)
        self.location = tuple(location)


Location = tuple[str | int, ...]

# PyYAML's words for the usual hand-editing mistakes, in plain words. The scanner notices an unclosed quote
# or bracket, or a missing ':', lines later: these problems are reported where the broken part starts.
_YAML_HINTS = (
    ("'\\t'", "a tab is used for indentation: indent with spaces only"),
    ("while scanning a quoted scalar", "a quoted text starts here but is never closed"),
    ("while parsing a flow sequence", "a list opened with '[' here is not closed properly"),
    ("while parsing a flow mapping", "a mapping opened with '{' here is not closed properly"),
    ("while scanning a simple key", "a field here has no ':' after its name"),
    ("mapping values are not allowed here", "a second ':' on this line (put the value in quotes)"),
    ("expected <block end>", "the indentation here does not line up with the lines above"),
    ("expected a single document", "a second document ('---') starts here: the file must hold one"),
)


def _yaml_problem(path: str, error: yaml.MarkedYAMLError) -> Problem:
    mark, context = error.problem_mark, error.context or ""
    if error.context_mark is not None and (context.startswith("while scanning") or "flow" in context):
        mark = error.context_mark
    original = " ".join(part for part in (error.context, error.problem) if part) or str(error)
    hint = next((hint for words, hint in _YAML_HINTS if words in original), None)
    message = f"not valid YAML: {hint} ({original})" if hint else f"not valid YAML: {original}"
    return Problem(path, mark.line + 1 if mark is not None else None, message)


def _lines(node: yaml.Node, path: Location, into: dict[Location, int], repeated: list[tuple[str, int]]) -> None:
    into[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            where = (*path, f"{key.value}\0key")
            if where in into and key.value != "<<":
                repeated.append((str(key.value), key.start_mark.line + 1))
            into[where] = key.start_mark.line + 1
            _lines(value, (*path, key.value), into, repeated)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _lines(item, (*path, index), into, repeated)


@dataclass(frozen=True)
class YamlDocument:
    """Parsed YAML data and the line of every key and value in it."""

    path: str
    data: Any
    lines: Mapping[tuple[str | int, ...], int]

    def line_of(self, location: Sequence[str | int]) -> int | None:
        """The line of the deepest part of `location` that exists in the file."""
        loc = tuple(location)
        while loc:
            if loc in self.lines:
                return self.lines[loc]
            loc = loc[:-1]
        return self.lines.get(())


def read_yaml(path: str | Path, transform: Callable[[str], str] | None = None) -> YamlDocument:
    """Parse the YAML file at `path` (after `transform` of its text, e.g. env interpolation)."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise FileInvalid([Problem(name, None, f"cannot read the file: {error.strerror or error}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        bad_line = raw.count(b"\n", 0, error.start) + 1
        message = f"the file is not UTF-8 text (byte 0x{raw[error.start]:02x}); save it with UTF-8 encoding"
        raise FileInvalid([Problem(name, bad_line, message)]) from None
    if transform is not None:
        text = transform(text)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        raise FileInvalid([_yaml_problem(name, error)]) from None
    except yaml.YAMLError as error:
        raise FileInvalid([Problem(name, None, f"not valid YAML: {error}")]) from None
    lines: dict[Location, int] = {}
    repeated: list[tuple[str, int]] = []
    if node is not None:
        _lines(node, (), lines, repeated)
    if repeated:
        # YAML keeps the last of two equal keys without a word: an edit would silently undo another
        message = "'{}' is set a second time here (YAML would silently keep only the last)"
        raise FileInvalid([Problem(name, line, message.format(key)) for key, line in repeated])
    return YamlDocument(name, data, lines)


def _inside(location: Sequence[str | int], container: Sequence[str | int]) -> bool:
    return len(location) > len(container) and tuple(location[: len(container)]) == tuple(container)


def validate(document: YamlDocument, model: type[Model], context: Mapping[str, Any] | None = None) -> Model:
    """The document as `model`, or FileInvalid listing every problem with its line."""
    if not isinstance(document.data, dict):
        raise FileInvalid([Problem(document.path, 1, "the file must hold a mapping of fields (key: value)")])
    try:
        return model.model_validate(document.data, context=dict(context or {}))
    except pydantic.ValidationError as error:
        problems = []
        items = error.errors()
        for item in items:
            loc = list(item["loc"])
            if item["type"] == "too_short" and any(_inside(other["loc"], item["loc"]) for other in items):
                continue  # pydantic counts only the valid entries: the real problems are inside the list
            part = item.get("ctx", {}).get("error")
            if isinstance(part, InvalidPart):
                loc.extend(part.location)
            line = document.line_of([*loc[:-1], f"{loc[-1]}\0key"]) if item["type"] == "extra_forbidden" else None
            message = plain(item, loc, document.data, model)
            problems.append(Problem(document.path, line or document.line_of(loc), message))
        # in the file's order, as a reader fixes them (pydantic lists them in the model's order)
        problems.sort(key=lambda problem: problem.line or 0)
        raise FileInvalid(problems) from None
